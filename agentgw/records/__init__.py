"""Records, settings and helpers that several rooms share, one module per feature.

They sit just above the core (`call`, `errors`, `pipeline`) and below storage, the stages and the
upstream clients, so that each of those can import them without importing one another: storage
writes an `AuditRecord` without knowing the audit stage, an upstream client takes a
`GatewayCredential` without knowing the credentials stage. A module here imports only the core.
"""
