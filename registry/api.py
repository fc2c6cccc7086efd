"""Admin API of the registry (control plane, FastAPI, documented at /docs)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status

from registry.models import McpServerSpec, VirtualServerSpec, validate_name
from registry.store import RegistryConflict, RegistryStore

__all__ = ["registry_router"]

Guard = Callable[..., Awaitable[Any]]


def registry_router(store: RegistryStore, read_guard: Guard, write_guard: Guard) -> APIRouter:
    """Routes under /admin/registry; each guarded by the policy grant on `admin:registry`."""
    router = APIRouter(prefix="/admin/registry", tags=["registry"])
    # Guards as default values, not local Annotated aliases: FastAPI cannot resolve a local alias
    # under postponed annotations (it would become a required query parameter).
    read = Depends(read_guard)
    write = Depends(write_guard)

    def _name(name: str) -> str:
        try:
            return validate_name(name)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    @router.get("/servers", response_model=list[McpServerSpec])
    async def list_servers(_: Any = read) -> list[McpServerSpec]:
        return store.all_servers()

    @router.get("/servers/{name}", response_model=McpServerSpec)
    async def show_server(name: str, _: Any = read) -> McpServerSpec:
        for spec in store.all_servers():
            if spec.name == _name(name):
                return spec
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no server named {name!r}")

    @router.post("/servers", response_model=McpServerSpec, status_code=status.HTTP_201_CREATED)
    async def add_server(spec: McpServerSpec, _: Any = write) -> McpServerSpec:
        try:
            store.put_server(spec)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return spec

    @router.put("/servers/{name}", response_model=McpServerSpec)
    async def replace_server(name: str, spec: McpServerSpec, _: Any = write) -> McpServerSpec:
        if _name(name) != spec.name:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the name in the path and body differ")
        try:
            store.put_server(spec, replace=True)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return spec

    @router.delete("/servers/{name}", status_code=status.HTTP_204_NO_CONTENT)
    async def remove_server(name: str, _: Any = write) -> None:
        try:
            removed = store.remove_server(_name(name))
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        if not removed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no server named {name!r}")

    @router.get("/virtual-servers", response_model=list[VirtualServerSpec])
    async def list_virtual(_: Any = read) -> list[VirtualServerSpec]:
        return store.virtual_servers()

    @router.post("/virtual-servers", response_model=VirtualServerSpec, status_code=status.HTTP_201_CREATED)
    async def add_virtual(spec: VirtualServerSpec, _: Any = write) -> VirtualServerSpec:
        try:
            store.put_virtual(spec)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return spec

    @router.delete("/virtual-servers/{name}", status_code=status.HTTP_204_NO_CONTENT)
    async def remove_virtual(name: str, _: Any = write) -> None:
        try:
            removed = store.remove_virtual(_name(name))
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        if not removed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no virtual server named {name!r}")

    return router
