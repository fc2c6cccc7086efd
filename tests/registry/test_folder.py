"""The registry as files: a folder of server.json documents (plus agentgw's `_meta` fields) is the
config's, read at start and again when a file changes; `agentgw registry import` reads server.json
files or another registry's API (fetched through the SSRF guard) into the registry."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentgw.app import create_app
from agentgw.cli import main
from agentgw.errors import ConfigError
from agentgw.oauth.server import mint_token
from agentgw.registry.folder import EXTENSION, RegistryFolder, spec_of_server_json, to_server_json, watch
from agentgw.registry.models import McpServerSpec
from agentgw.settings import load_settings
from tests.support.servers import LocalServer

BASE = "http://127.0.0.1:8080"
SCHEMA = "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json"


def document(name: str, url: str, **meta: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "$schema": SCHEMA,
        "name": name,
        "description": f"{name} for tests",
        "version": "1.0.0",
        "remotes": [{"type": "streamable-http", "url": url}],
    }
    if meta:
        doc["_meta"] = {EXTENSION: meta}
    return doc


def write(folder: Path, file: str, doc: object) -> None:
    folder.mkdir(exist_ok=True)
    (folder / file).write_text(json.dumps(doc))


def test_a_document_becomes_the_upstream_it_names_with_agentgw_fields_from_meta() -> None:
    spec = spec_of_server_json(
        document(
            "io.github.acme/Weather_API",
            "https://weather.example.com/mcp",
            credential={"mode": "static", "secret": "weather-key"},
            scopes=["weather.read"],
            timeout_s=5.0,
        )
    )
    assert spec.name == "weather-api"
    assert (spec.url, spec.transport, spec.version) == (
        "https://weather.example.com/mcp",
        "streamable-http",
        "1.0.0",
    )
    assert spec.credential.mode == "static" and spec.scopes == ["weather.read"] and spec.timeout_s == 5.0
    # Written back, the document reads as the same upstream.
    assert spec_of_server_json(to_server_json(spec, "io.github.acme/Weather_API")) == spec


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ([], "JSON object"),
        ({"description": "x"}, "`name` is missing"),
        ({"name": "a/b", "packages": [{"registryType": "npm", "identifier": "x"}]}, "no remote"),
        ({"name": "a/b", "remotes": [{"type": "stdio"}]}, "streamable-http or sse"),
        ({"name": "a/b", "remotes": [{"type": "sse", "url": "ftp://x"}]}, "invalid url"),
        ({"name": "a/___", "remotes": [{"type": "sse", "url": "http://x"}]}, "invalid name"),
        (document("a/b", "http://x", credential={"mode": "static", "env": "HOME"}), "never an environment"),
        (document("a/b", "http://x", hooks="rm -rf /"), "hooks"),
        (
            {"name": "a/b", "remotes": [{"type": "sse", "url": "http://x"}], "_meta": {EXTENSION: []}},
            "object",
        ),
    ],
)
def test_a_document_the_gateway_cannot_run_is_refused_with_the_reason(doc: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        spec_of_server_json(doc)


def test_a_bad_file_or_a_name_in_two_files_stops_the_load_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "registry"
    write(folder, "a.json", document("x/alpha", "http://127.0.0.1:9/mcp"))
    write(folder, "b.json", document("y/alpha", "http://127.0.0.1:9/mcp"))
    with pytest.raises(ConfigError, match=r"b\.json: server 'alpha' is declared in a\.json too"):
        RegistryFolder(folder).load()
    (folder / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"b\.json: "):
        RegistryFolder(folder).load()
    with pytest.raises(ConfigError, match="not a directory"):
        RegistryFolder(tmp_path / "missing").load()


async def test_the_gateway_serves_the_folder_and_publishes_its_own_url_for_it(tmp_path: Path) -> None:
    folder = tmp_path / "registry"
    write(folder, "weather.json", document("io.github.acme/weather", "http://127.0.0.1:9/upstream"))
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "registry:\n  folder: registry\n  namespace: com.example\n"
        "policy:\n  rules: ['p, role:dev, mcp:*, *, allow']\n"
    )
    settings = load_settings(config, data_dir=tmp_path / "data")
    assert settings.registry.folder == folder.resolve()
    app = create_app(settings)
    gateway = app.state.gateway
    assert gateway.registry.server("weather").url == "http://127.0.0.1:9/upstream"
    assert gateway.registry.owner("weather") == "config"  # the folder is the config's: not API-editable
    token, _ = mint_token(gateway.identity.keys, BASE, subject="a", audience=f"{BASE}/mcp", roles=["dev"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        listed = (await http.get("/v0.1/servers", headers={"authorization": f"Bearer {token}"})).json()
    [entry] = listed["servers"]
    assert entry["server"]["name"] == "com.example/weather"
    assert entry["server"]["remotes"] == [{"type": "streamable-http", "url": f"{BASE}/mcp/weather"}]


async def test_a_changed_folder_is_applied_and_a_broken_one_leaves_the_registry_as_it_was(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "registry"
    write(folder, "a.json", document("x/alpha", "http://127.0.0.1:9/mcp"))
    reader = RegistryFolder(folder)
    applied: list[list[str]] = [[s.name for s in reader.load()]]
    changed = asyncio.Event()

    def apply(servers: list[McpServerSpec]) -> None:
        applied.append(sorted(s.name for s in servers))
        changed.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch, reader, apply, 0.01)
        write(folder, "b.json", document("x/beta", "http://127.0.0.1:9/mcp"))
        async with asyncio.timeout(10):
            await changed.wait()
        assert applied[-1] == ["alpha", "beta"]
        changed.clear()
        (folder / "b.json").write_text("{broken")
        write(folder, "c.json", document("x/gamma", "http://127.0.0.1:9/mcp"))
        (folder / "b.json").unlink()  # fixed again: the next change applies the whole folder
        async with asyncio.timeout(10):
            await changed.wait()
        tasks.cancel_scope.cancel()
    assert applied[-1] == ["alpha", "gamma"]


# --- agentgw registry import ---


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["registry", "import", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def config_file(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "gateway.yaml"
    db = tmp_path / "r.db"
    config.write_text(f"database_url: sqlite:///{db}\ndata_dir: {tmp_path / 'data'}\n{extra}")
    return config


def listed(capsys: pytest.CaptureFixture[str], config: Path) -> str:
    assert main(["registry", "list", "--config", str(config)]) == 0
    return capsys.readouterr().out


def test_import_reads_files_into_the_database_and_skips_what_it_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    write(source, "one.json", document("io.github.acme/one", "http://127.0.0.1:9/one"))
    write(source, "two.json", {"name": "io.github.acme/two", "packages": [{"registryType": "npm"}]})
    config = config_file(tmp_path)
    code, out, err = run(capsys, config, str(source))
    assert code == 1
    assert "imported io.github.acme/one as one" in out
    assert "skipped io.github.acme/two: no remote" in err
    assert "one\tstreamable-http\thttp://127.0.0.1:9/one\tenabled" in listed(capsys, config)
    # Again: the name is taken; --replace updates it.
    assert run(capsys, config, str(source / "one.json"))[0] == 1
    assert run(capsys, config, str(source / "one.json"), "--replace")[0] == 0


def test_import_to_a_folder_writes_documents_the_folder_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "one.json"
    source.write_text(json.dumps(document("io.github.acme/one", "http://127.0.0.1:9/one", timeout_s=7.0)))
    config = config_file(tmp_path)
    target = tmp_path / "registry"
    assert run(capsys, config, str(source), "--to-folder", str(target))[0] == 0
    [spec] = RegistryFolder(target).load()
    assert (spec.name, spec.url, spec.timeout_s) == ("one", "http://127.0.0.1:9/one", 7.0)
    assert run(capsys, config, str(source), "--to-folder", str(target))[0] == 1  # no silent overwrite


@contextmanager
def fixture_registry(documents: list[dict[str, Any]], page: int = 2) -> Iterator[tuple[str, list[str]]]:
    """Another registry on 127.0.0.1, paging its `documents` `page` at a time; yields its URL and the
    cursors it was asked for."""
    asked: list[str] = []

    async def servers(request: Request) -> JSONResponse:
        cursor = request.query_params.get("cursor", "")
        asked.append(cursor)
        start = int(cursor or 0)
        chunk = documents[start : start + page]
        metadata: dict[str, Any] = {"count": len(chunk)}
        if start + page < len(documents):
            metadata["nextCursor"] = str(start + page)
        return JSONResponse({"servers": [{"server": d, "_meta": {}} for d in chunk], "metadata": metadata})

    server = LocalServer()
    stop = threading.Event()

    async def serve() -> None:
        async with server.serve(Starlette(routes=[Route("/v0.1/servers", servers)])):
            await anyio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        yield server.url, asked
    finally:
        stop.set()
        thread.join(10)


def test_import_pages_through_another_registry_allowed_by_fetch_allow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [document(f"io.example/s{i}", f"http://127.0.0.1:9/s{i}") for i in range(5)]
    with fixture_registry(docs) as (url, asked):
        config = config_file(tmp_path, "fetch_allow: ['127.0.0.1']\n")
        code, out, err = run(capsys, config, url, "--allow-http")
    assert code == 0, err
    assert asked == ["", "2", "4"]
    assert [line.split()[-1] for line in out.splitlines()] == ["s0", "s1", "s2", "s3", "s4"]
    assert "5 imported, 0 skipped" in err


def test_import_from_a_loopback_registry_is_refused_without_fetch_allow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with fixture_registry([document("io.example/s", "http://127.0.0.1:9/s")]) as (url, asked):
        config = config_file(tmp_path)
        code, _, err = run(capsys, config, url, "--allow-http")
        assert (code, asked) == (2, [])
        assert "address 127.0.0.1 is not allowed" in err
        code, _, err = run(capsys, config, url)  # plain http without --allow-http
        assert code == 2 and "only https URLs are fetched" in err
    assert "s\t" not in listed(capsys, config)
