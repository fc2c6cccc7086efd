"""Named secrets: declared in the config file, referred to by name everywhere else.

    secrets:
      github-pat:
        env: GITHUB_PAT                       # or file: /run/secrets/github-pat
        send_to: [https://api.githubcopilot.com/]

Upstream credentials (MCP servers, A2A agents, LLM routes) name a secret (`secret: github-pat`), never
where it lives: specs are stored, shown by `registry show` and the admin API, and written to the
audit log, and whoever may write a spec must not be able to point the gateway at a file or variable
of their choosing (docs/decisions/0700). `send_to` lists the URL prefixes the secret may be sent to
(an upstream URL, a token endpoint); a secret without it serves only the config file's upstreams,
and the admin API cannot name it.

The gateway's own key material (data directory, database, signing key, config file, `AGENTGW_*`
variables) is never a secret here, however it is spelled: checked when the book is built and again
at every read (a path may have become a link since).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agentgw.registry.models import Url, validate_name

__all__ = [
    "PROTECTED_ENV_PREFIXES",
    "Secret",
    "SecretRefused",
    "SecretSource",
    "SecretUnavailable",
    "Secrets",
    "url_within",
]

# Every setting of the gateway (database URL included) and the settings handed to worker processes.
PROTECTED_ENV_PREFIXES = ("AGENTGW_", "_AGENTGW_")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _validate_env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"invalid environment variable name {name!r}")
    if name.upper().startswith(PROTECTED_ENV_PREFIXES):
        raise ValueError(f"environment variable {name} is the gateway's own setting, never a secret to send")
    return name


class SecretSource(BaseModel):
    """Where one named secret lives (exactly one of `env`, `file`) and where it may be sent."""

    model_config = ConfigDict(extra="forbid")

    env: Annotated[str, AfterValidator(_validate_env_name)] | None = None
    file: Path | None = None
    # URL prefixes (scheme, host, port and a path prefix) the secret may be sent to. Empty: only
    # upstreams declared in the config file may name it.
    send_to: list[Url] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env (a variable name) or file (a path) for the secret")
        return self


class SecretRefused(ValueError):
    """A secret may not be named here: undeclared, not for this destination, or the gateway's own."""


class SecretUnavailable(ValueError):
    """A declared secret cannot be read. `str()` names the secret only; `detail` says where, for logs."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"secret {name!r} cannot be read")
        self.detail = detail


class Secret:
    """A secret held in memory only: its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one header that carries it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def _origin(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port, parts.path or "/"


def url_within(url: str, prefix: str) -> bool:
    """Whether `url` is at or under `prefix`: same scheme, host and port, and a path under the prefix's
    at a segment boundary (`https://a.example/v1` covers `/v1` and `/v1/x`, not `/v10` or `a.example.net`)."""
    scheme, host, port, path = _origin(url)
    p_scheme, p_host, p_port, p_path = _origin(prefix)
    if (scheme, host, port) != (p_scheme, p_host, p_port) or not host:
        return False
    base = p_path.rstrip("/")
    return path == p_path or path.rstrip("/") == base or path.startswith(f"{base}/")


def _covers(protected: Path, path: Path) -> bool:
    if path == protected or protected in path.parents:
        return True
    try:
        return os.path.samefile(path, protected)  # a hard link to a protected file
    except OSError:
        return False


class Secrets:
    """The declared secrets, read on demand; the one place a secret's location is known."""

    def __init__(self, declared: Mapping[str, SecretSource], protected: Iterable[Path] = ()) -> None:
        """Keep the declarations and the paths never read as secrets (files, or directories and all
        below them).

        Raises:
            SecretRefused: a name is invalid, or a declaration points at the gateway's own material.
        """
        for name in declared:
            try:
                validate_name(name)
            except ValueError as exc:
                raise SecretRefused(f"secrets: {exc}") from exc
        self._declared = dict(declared)
        self._protected = [p.resolve() for p in protected]
        for name, source in self._declared.items():
            if source.file is not None and self._is_protected(source.file):
                raise SecretRefused(
                    f"secret {name!r}: {source.file} is the gateway's own state (data directory, "
                    "database, signing key or config file), never an upstream credential"
                )

    def _is_protected(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(_covers(protected, resolved) for protected in self._protected)

    def names(self) -> list[str]:
        return sorted(self._declared)

    def check(self, name: str, destinations: Sequence[str], *, from_config: bool) -> None:
        """Refuse naming secret `name` for a credential sent to `destinations`.

        `from_config`: the spec comes from the config file (its author declared the secrets too), so a
        secret without `send_to` is allowed; anything else must name a secret declared for the API.

        Raises:
            SecretRefused: undeclared, not declared for the admin API, or a destination outside `send_to`.
        """
        source = self._declared.get(name)
        if source is None:
            raise SecretRefused(f"unknown secret {name!r}: declare it under `secrets:` in the config file")
        if not source.send_to:
            if from_config:
                return
            raise SecretRefused(
                f"secret {name!r} is for upstreams of the config file only: give it `send_to` URLs to "
                "let the admin API name it"
            )
        for destination in destinations:
            if not any(url_within(destination, prefix) for prefix in source.send_to):
                raise SecretRefused(f"secret {name!r} may not be sent to {destination} (see its send_to)")

    def read(self, name: str) -> Secret:
        """The value of secret `name`, read now.

        Raises:
            SecretRefused: `name` is undeclared, or its file is (now) the gateway's own.
            SecretUnavailable: the variable is unset or empty, the file unreadable or empty.
        """
        source = self._declared.get(name)
        if source is None:
            raise SecretRefused(f"unknown secret {name!r}: declare it under `secrets:` in the config file")
        if source.env is not None:
            value = os.environ.get(source.env, "").strip()
            if not value:
                raise SecretUnavailable(name, f"environment variable {source.env} is not set or empty")
            return Secret(value)
        assert source.file is not None
        if self._is_protected(source.file):
            raise SecretRefused(f"secret {name!r}: its file is the gateway's own state, never a credential")
        try:
            value = source.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            # The path is configuration, not a secret; the OS error says why (missing, permissions).
            raise SecretUnavailable(name, f"cannot read file {source.file}: {exc.strerror}") from exc
        if not value:
            raise SecretUnavailable(name, f"file {source.file} is empty")
        return Secret(value)
