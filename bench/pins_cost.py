"""What pinning costs in process: screening a listing, and the checks a prompts/get or resources/read
makes before it is forwarded.

    python -m bench.pins_cost            # 100 prompts and 100 resource templates

Pins live in a SQLite file in a temporary folder; the listing screened is unchanged, so no write
happens (the data plane's steady state). Numbers are wall time per operation in this process.
"""

from __future__ import annotations

import argparse
import tempfile
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentgw.registry.pins import PinGate, Pins
from agentgw.storage import create_db, make_engine

__all__ = ["main"]


def _per_op(work: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(work, number=number, repeat=3)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pins_cost")
    parser.add_argument("--items", type=int, default=100)
    args = parser.parse_args(argv)
    n = args.items
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'pins.db'}")
        create_db(engine)
        gate = PinGate(Pins(engine), lambda server: "first-sight")
        templates = [
            {"uriTemplate": f"t{i}://{{a}}/{{b}}", "name": f"t{i}", "description": "x" * 200}
            for i in range(n)
        ]
        prompts = [
            {"name": f"p{i}", "description": "x" * 200, "arguments": [{"name": "a"}]} for i in range(n)
        ]
        gate.visible("up", "resourceTemplates", templates)
        gate.visible("up", "prompts", prompts)
        rows = [
            (
                f"resources/templates/list of {n}, unchanged",
                _per_op(lambda: gate.visible("up", "resourceTemplates", templates), 200),
            ),
            (
                "prompts/get check",
                _per_op(lambda: gate.refusal("up", "prompts/get", {"name": "p5"}), 100_000),
            ),
            (
                "resources/read check, every template approved",
                _per_op(lambda: gate.refusal("up", "resources/read", {"uri": "t5://x/y"}), 100_000),
            ),
        ]
        gate.visible("up", "resourceTemplates", [templates[0] | {"description": "changed"}, *templates[1:]])
        uri = f"t{n - 1}://x/y"
        rows.append(
            (
                f"resources/read check, 1 of {n} templates quarantined",
                _per_op(lambda: gate.refusal("up", "resources/read", {"uri": uri}), 2000),
            )
        )
        engine.dispose()
    for what, us in rows:
        print(f"{what:55} {us:9.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
