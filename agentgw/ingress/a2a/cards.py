"""The agent card a caller gets: the agent's own, rewritten to be reached through the gateway.

Pure functions: the ingress fetches the card, the policy stage decides which skills the caller may
see, and this module writes the card that says so.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from agentgw.registry.a2a import version_of

__all__ = ["CardSecurity", "rewrite_card"]


@dataclass(frozen=True, slots=True)
class CardSecurity:
    """How the rewritten card tells callers to authenticate: to the gateway, never to the agent.

    `schemes`/`requirements` are in A2A 1.0's JSON form; `legacy_schemes`/`legacy_requirements` are
    the 0.3 forms, added when the card also carries 0.3 fields.
    """

    schemes: Mapping[str, Any]
    requirements: Sequence[Mapping[str, Any]]
    legacy_schemes: Mapping[str, Any]
    legacy_requirements: Sequence[Mapping[str, Any]]

    @classmethod
    def bearer(cls, *, required: bool, name: str = "agentgw", description: str | None = None) -> CardSecurity:
        """A bearer-token scheme; required unless the gateway admits anonymous callers."""
        text = description or "A bearer token issued for the agentgw gateway (never the agent's own)"
        return cls(
            schemes={
                name: {
                    "httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "JWT", "description": text}
                }
            },
            requirements=[{"schemes": {name: {"list": []}}}] if required else [],
            legacy_schemes={
                name: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": text}
            },
            legacy_requirements=[{name: []}] if required else [],
        )


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def rewrite_card(
    card: Mapping[str, Any], *, agent_url: str, allowed_skills: Collection[str], security: CardSecurity
) -> dict[str, Any]:
    """The card a caller gets: the agent's, reached through the gateway, listing only allowed skills.

    Every interface URL becomes `agent_url` (gRPC interfaces are dropped: the gateway does not proxy
    them); security schemes and requirements become the gateway's; skills not in `allowed_skills` (ids)
    are removed and the rest lose their per-skill requirements; upstream signatures are removed (they
    no longer match). Everything else is the agent's own. A 0.3-style card stays 0.3-style.
    """
    out: dict[str, Any] = {k: _copy(v) for k, v in card.items() if k != "signatures"}
    modern = isinstance(card.get("supportedInterfaces"), list) or "url" not in card
    legacy = isinstance(card.get("url"), str)
    if modern:
        interfaces = []
        declared = card.get("supportedInterfaces")
        for item in declared if isinstance(declared, list) else []:
            if not isinstance(item, Mapping) or item.get("protocolBinding") not in ("JSONRPC", "HTTP+JSON"):
                continue
            if version_of(item.get("protocolVersion")) is None:
                continue
            entry = {"url": agent_url, "protocolBinding": item["protocolBinding"]}
            if item.get("protocolVersion"):
                entry["protocolVersion"] = item["protocolVersion"]
            if isinstance(item.get("tenant"), str) and item["tenant"]:
                entry["tenant"] = item["tenant"]
            if entry not in interfaces:
                interfaces.append(entry)
        out["supportedInterfaces"] = interfaces
        out["securitySchemes"] = _copy(security.schemes)
        out["securityRequirements"] = _copy(security.requirements)
        out.pop("security", None)
    if legacy:
        extra = card.get("additionalInterfaces")
        transports = [
            i.get("transport")
            for i in (extra if isinstance(extra, list) else [])
            if isinstance(i, Mapping) and i.get("transport") in ("JSONRPC", "HTTP+JSON")
        ]
        preferred = card.get("preferredTransport", "JSONRPC")
        if preferred not in ("JSONRPC", "HTTP+JSON"):
            preferred = transports[0] if transports else "JSONRPC"
        out["url"] = agent_url
        out["preferredTransport"] = preferred
        if "additionalInterfaces" in card:
            out["additionalInterfaces"] = [
                {"url": agent_url, "transport": t} for t in dict.fromkeys(transports)
            ]
        schemes = out.get("securitySchemes") if modern else None
        merged: dict[str, Any] = dict(schemes) if isinstance(schemes, dict) else {}
        for name, legacy_scheme in security.legacy_schemes.items():
            # The 0.3 fields sit beside the 1.0 ones, as a2a-sdk serves a card for both generations.
            merged[name] = {**merged.get(name, {}), **_copy(legacy_scheme)}
        out["securitySchemes"] = merged
        out["security"] = _copy(security.legacy_requirements)
    for key in ("securityRequirements", "security"):
        if key in out and not out[key]:
            del out[key]
    allowed = set(allowed_skills)
    skills = card.get("skills")
    out["skills"] = [
        {k: _copy(v) for k, v in s.items() if k not in ("securityRequirements", "security")}
        for s in (skills if isinstance(skills, list) else [])
        if isinstance(s, Mapping) and s.get("id") in allowed
    ]
    return out
