"""The installed gateway runs on its declared dependencies alone: every third-party module that the
shipped packages import is a runtime dependency in pyproject.toml, not only a test extra."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = ["agentgw"]


def imported_top_level_modules(package_dir: Path) -> dict[str, str]:
    """Every top-level module name imported anywhere in a package (nested imports included),
    mapped to one file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(package_dir.parent)))
    return found


def third_party_distributions() -> dict[str, str]:
    """Distribution name -> a file that needs it, for every import that is not stdlib or ours."""
    by_module = importlib.metadata.packages_distributions()
    needed: dict[str, str] = {}
    for package in SHIPPED:
        for module, where in imported_top_level_modules(ROOT / package).items():
            if module in sys.stdlib_module_names or module in SHIPPED or module == "__future__":
                continue
            dists = by_module.get(module)
            assert dists, f"{where} imports {module!r}, which no installed distribution provides"
            names = sorted({canonicalize_name(d) for d in dists})
            # A namespace package several distributions fill (`opentelemetry`): the ones declared
            # are the ones it needs, so only a namespace none of them fills is reported.
            runtime = declared(PYPROJECT["project"]["dependencies"])
            needed[next((n for n in names if n in runtime), names[0])] = where
    return needed


def declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_every_third_party_import_of_the_shipped_code_is_a_runtime_dependency() -> None:
    runtime = declared(PYPROJECT["project"]["dependencies"])
    missing = {dist: where for dist, where in third_party_distributions().items() if dist not in runtime}
    assert not missing, f"imported at run time but not in [project] dependencies: {missing}"


def test_the_import_scan_sees_nested_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("def f():\n    import yaml\n    from jwt import decode\n")
    assert set(imported_top_level_modules(pkg)) == {"yaml", "jwt"}


def test_the_test_extra_holds_no_runtime_dependency_twice() -> None:
    runtime = declared(PYPROJECT["project"]["dependencies"])
    test_only = declared(PYPROJECT["project"]["optional-dependencies"]["test"])
    # a2a-sdk is both: the gateway needs its core, the tests its server extra.
    assert runtime & test_only <= {"a2a-sdk"}
