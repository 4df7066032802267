"""The package's shape: no import cycles (imports inside functions included), and the library never
imports its command line, so evaluations and benchmarks stay usable (and testable) without it."""

import ast
from pathlib import Path

import pytest

import lacache

SRC = Path(lacache.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["lacache", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
            subs = {f"{target}.{alias.name}" for alias in node.names} & known.keys()
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert "lacache.cache.bounded" in graph and graph["lacache.cache.bounded"]  # the walk sees the package
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_catches_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


#: entry points that start the command line (``python -m lacache``), not part of the library
ENTRY_POINTS = {"lacache.__main__"}


def test_nothing_outside_the_cli_imports_the_cli():
    offenders = {name: sorted(m for m in deps if m == "lacache.cli" or m.startswith("lacache.cli."))
                 for name, deps in _graph().items() if not name.startswith("lacache.cli") and name not in ENTRY_POINTS}
    assert not {k: v for k, v in offenders.items() if v}


def _part(module: str) -> str:
    """Which part of the package ``module`` belongs to: rule, backend, lab, cli, or the package root."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    head = parts[1]
    if head in ("policies", "registry", "checks", "_lazy"):  # _lazy: torch on first use
        return "rule"
    if head in ("cache", "vllm", "rope"):
        return "backend"
    if head == "support":  # the support matrix: declares what the backends do
        return "support"
    return {"lab": "lab", "cli": "cli", "__main__": "cli", "_moved": "root"}.get(head, f"unplaced:{head}")


def test_every_module_belongs_to_one_part():
    unplaced = sorted(name for name in _modules() if _part(name).startswith("unplaced"))
    assert not unplaced, f"modules outside the rule / backends / support matrix / lab / cli: {unplaced}"


@pytest.mark.parametrize("part, may_not_import", [
    ("rule", {"backend", "lab", "cli"}),
    ("backend", {"support", "lab", "cli"}),
    ("support", {"lab", "cli"}),
    ("lab", {"cli"}),
])
def test_each_part_imports_only_what_is_beneath_it(part, may_not_import):
    """The rule knows no backend, the backends know no lab, and only the CLI knows the CLI."""
    offenders = {name: sorted(m for m in deps if _part(m) in may_not_import)
                 for name, deps in _graph().items() if _part(name) == part}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_rule_imports_no_torch_at_its_core():
    """The registry and the slot arithmetic stay torch-free, so a vLLM scheduler or a property test reads
    them cheaply (policies that score tensors import torch in their own files)."""
    for name in ("registry", "checks", "policies/ladder_geometry", "policies/authors_schedule", "policies/plan"):
        tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
        top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        modules = {alias.name for node in top if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in top if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in modules if m.split(".")[0] in ("torch", "transformers")}, name


def test_old_module_paths_import_the_same_modules():
    import importlib

    from lacache._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    import lacache.evaluation.perplexity as old_submodule

    import lacache.lab.evaluation.perplexity as new_submodule

    assert old_submodule is new_submodule
