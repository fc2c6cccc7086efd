"""What the registry admits: the checks a server spec passes before it is stored (admin API, CLI) and
again before the gateway runs it (every start, every change), so that a row stored earlier, or by
another writer, is judged by the rules of today's config file.

Two rules (docs/decisions/0700):

- Credentials name declared secrets only, each declared for that use (agentgw/registry/secrets.py): the
  admin API names only secrets with `send_to`, and only for destinations under it.
- A stdio server runs a command as the gateway's user: it comes from the config file, or its command
  line starts with an entry of `stdio_allowed_commands` and it sets no environment (`PATH`,
  `LD_PRELOAD`, `NODE_OPTIONS` would choose what actually runs). The admin API also wants the
  `admin:exec` grant for it, checked by the route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentgw.registry.models import McpServerSpec, credential_secrets
from agentgw.registry.secrets import SecretRefused, Secrets, SecretUnavailable

__all__ = ["Admission"]


@dataclass(frozen=True, slots=True)
class Admission:
    """The rules of one config file: its secrets, its stdio allow-list, the built-in token endpoint."""

    secrets: Secrets
    # Command lines (`[command, *leading args]`) a stdio server not declared in the config file may run.
    stdio_commands: Sequence[Sequence[str]] = ()
    # Where a client secret for the built-in authorization server goes (`token_url` unset).
    builtin_token_url: str = ""

    def command_allowed(self, spec: McpServerSpec) -> bool:
        """Whether a stdio server from outside the config file may run (an allow-listed command line)."""
        argv = [spec.command or "", *spec.args]
        return not spec.env and any(
            list(entry) == argv[: len(entry)] for entry in self.stdio_commands if entry
        )

    def refusal(self, spec: McpServerSpec, *, from_config: bool) -> str | None:
        """Why `spec` may not be stored or run (without reading any secret); None if it may."""
        if spec.transport == "stdio" and not from_config and not self.command_allowed(spec):
            return (
                "a stdio server runs a command on the gateway's host: it is declared in the config file, "
                "or its command line is one of stdio_allowed_commands (and it sets no env)"
            )
        for name, destination in credential_secrets(spec.credential, spec.url):
            try:
                self.secrets.check(name, [destination or self.builtin_token_url], from_config=from_config)
            except SecretRefused as exc:
                return str(exc)
        return None

    def problem(self, spec: McpServerSpec, *, from_config: bool) -> str | None:
        """Why `spec` cannot serve: a refusal, or a secret it names that cannot be read now. The text
        names secrets, never where they live (it is shown by the admin API)."""
        refused = self.refusal(spec, from_config=from_config)
        if refused is not None:
            return refused
        for name, _ in credential_secrets(spec.credential, spec.url):
            try:
                self.secrets.read(name)
            except (SecretUnavailable, SecretRefused) as exc:
                return str(exc)
        return None
