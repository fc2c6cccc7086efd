"""Export: a stored record as an OpenTelemetry log record (OTLP/JSON), for `agentgw audit export`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["otel_record"]

_SEVERITY = {"allowed": (9, "INFO"), "denied": (13, "WARN"), "error": (17, "ERROR")}


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [{"key": k, "value": _any_value(v)} for k, v in value.items()]}}
    return {"stringValue": str(value)}


def otel_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as an OpenTelemetry log record (OTLP/JSON `LogRecord`), attributes `agentgw.*`."""
    moment = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    nanos = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    number, text = _SEVERITY.get(record["decision"], (9, "INFO"))
    body = f"{record['decision']} {record['action']} {record['resource']} by {record['subject'] or 'unknown'}"
    skip = {"time", "trace_id"}
    attributes = [
        {"key": f"agentgw.{k}", "value": _any_value(v)}
        for k, v in record.items()
        if k not in skip and v is not None and v != []
    ]
    out: dict[str, Any] = {
        "timeUnixNano": str(nanos),
        "observedTimeUnixNano": str(nanos),
        "severityNumber": number,
        "severityText": text,
        "eventName": f"agentgw.audit.{record['event']}",
        "body": {"stringValue": body},
        "attributes": attributes,
    }
    if record.get("trace_id"):
        out["traceId"] = record["trace_id"]
    return out
