"""Admin API routers of the gateway's own areas (control plane), one module per `admin:<area>`."""
