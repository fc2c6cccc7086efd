"""What an upstream is: validated specs (config file, admin API, CLI) and their SQL table.

Names become part of policy objects (`mcp:<server>/<tool>`) and of namespaced tool names, so the
charset is narrow on purpose: no `/`, `*`, `.`, `:` or whitespace can widen a pattern or fake a
separator.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import JSON, Column
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

__all__ = [
    "NAME_PATTERN",
    "McpServerRow",
    "McpServerSpec",
    "Transport",
    "VirtualServerRow",
    "VirtualServerSpec",
    "validate_name",
]

NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
Transport = Literal["streamable-http", "sse", "stdio"]


def validate_name(name: str) -> str:
    """Accept a registry name: lower-case ASCII letters, digits and inner single hyphens, 1-63 long.

    Raises:
        ValueError: the name has another character, is too long, or has `--` (a separator look-alike).
    """
    if not NAME_PATTERN.fullmatch(name) or "--" in name:
        raise ValueError(
            f"invalid name {name!r}: use 1-63 lower-case letters, digits and single inner hyphens"
        )
    return name


def _validate_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid url {url!r}: an absolute http(s) URL is required")
    if parts.username or parts.password:
        raise ValueError("invalid url: credentials in the URL are not allowed; use a credential mode")
    if parts.fragment:
        raise ValueError("invalid url: a fragment has no meaning for an upstream")
    return url


Name = Annotated[str, AfterValidator(validate_name)]
Url = Annotated[str, AfterValidator(_validate_url)]


class McpServerSpec(BaseModel):
    """An upstream MCP server as declared in the config file or through the admin API."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    transport: Transport = "streamable-http"
    url: Url | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    enabled: bool = True
    # Scopes a token must carry to use this server at all (published in the resource metadata).
    scopes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerSpec:
        if self.transport == "stdio":
            if not self.command:
                raise ValueError("a stdio server needs a command")
            if self.url:
                raise ValueError("a stdio server takes a command, not a url")
        else:
            if not self.url:
                raise ValueError(f"a {self.transport} server needs a url")
            if self.command or self.args:
                raise ValueError(f"a {self.transport} server takes a url, not a command")
        return self


class VirtualServerSpec(BaseModel):
    """A named selection of tools, prompts and resources from several upstreams, served at its own URL.

    Each selector is `<server>/<name>` or `<server>/*`; kinds are `tools`, `prompts`, `resources`.
    With `prefix: false` names are served unchanged (MCP Apps break on renamed tools); the registry
    then refuses selections whose names collide.
    """

    model_config = ConfigDict(extra="forbid")

    name: Name
    tools: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    resources: list[str] = Field(default_factory=list)
    prefix: bool = True

    @model_validator(mode="after")
    def _selectors(self) -> VirtualServerSpec:
        for selector in (*self.tools, *self.prompts, *self.resources):
            server, sep, item = selector.partition("/")
            validate_name(server)
            if not sep or not item:
                raise ValueError(f"invalid selector {selector!r}: use <server>/<name> or <server>/*")
        return self


class McpServerRow(SQLModel, table=True):
    """The stored form of an `McpServerSpec`; `source` says whether the config file owns it."""

    __tablename__ = "mcp_server"

    name: str = SQLField(primary_key=True)
    spec: dict[str, object] = SQLField(sa_column=Column(JSON, nullable=False))
    source: str = "api"


class VirtualServerRow(SQLModel, table=True):
    """The stored form of a `VirtualServerSpec`."""

    __tablename__ = "virtual_server"

    name: str = SQLField(primary_key=True)
    spec: dict[str, object] = SQLField(sa_column=Column(JSON, nullable=False))
    source: str = "api"
