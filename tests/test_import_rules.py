"""The dependency rules between packages, checked on the source (no imports run).

The client imports only the pure modules of ``blocks`` (the announcement record, the placement
rule, the RPC message rules), never its server runtime; model loading it shares with servers
lives in ``model_parts``. Pure modules import neither torch nor asyncio. ``model_parts`` and
``tensor_wire`` depend on no other package of ours except where listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_BLOCKS_MODULES = {
    "blocks.announcement", "blocks.placement", "blocks.protocol", "blocks.push_protocol",
    "blocks.swarm_reader",
}
OUR_PACKAGES = {"overlay", "tensor_wire", "model_parts", "blocks", "client", "sim"}
ALLOWED_DEPENDENCIES = {
    "overlay": set(),
    "tensor_wire": set(),
    "model_parts": set(),
    "blocks": {"overlay", "tensor_wire", "model_parts"},
    "client": {"overlay", "tensor_wire", "model_parts", "blocks"},
}


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _sources("client"), ids=lambda p: p.name)
def test_client_imports_only_pure_blocks_modules(path: Path) -> None:
    imported = {name for name in _imported_modules(path) if name.split(".")[0] == "blocks"}
    # ``from blocks import protocol`` names both ``blocks`` (an empty package) and the module.
    modules = {".".join(name.split(".")[:2]) for name in imported if name.count(".") >= 1}
    assert modules <= PURE_BLOCKS_MODULES, f"{path.name} imports {sorted(modules)}"


@pytest.mark.parametrize("module", sorted(PURE_BLOCKS_MODULES))
def test_pure_blocks_modules_import_neither_torch_nor_asyncio(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    roots = {name.split(".")[0] for name in _imported_modules(path)}
    assert not roots & {"torch", "asyncio", "transformers"}, f"{module} imports {roots}"
    ours = {root for root in roots if root in OUR_PACKAGES} - {"blocks", "overlay"}
    assert not ours, f"{module} imports {ours}"


@pytest.mark.parametrize("package", sorted(ALLOWED_DEPENDENCIES))
def test_packages_depend_only_on_what_design_allows(package: str) -> None:
    for path in _sources(package):
        roots = {name.split(".")[0] for name in _imported_modules(path)}
        others = (roots & OUR_PACKAGES) - {package}
        assert others <= ALLOWED_DEPENDENCIES[package], f"{path} imports {sorted(others)}"
