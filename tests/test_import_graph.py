"""The package's import graph: no circle, and the dense path never imports ``quantized/`` (the 4-bit
format plugs in from above: it registers its base kind and weight format when the package loads).

Every import statement counts, module-level or inside a function: an import run on first use closes a
circle as surely as one at the top. Importing ``a.b.c`` runs the ``a.b`` package too, so an edge to a
module is also an edge to each package above it, less the importer's own packages (they run before it)
and the root package, which imports everything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "flatlora_kernels"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
#: modules on the dense path: what a 4-bit base must plug into, not be imported by
DENSE_PATH = ("layer_support", "step_noise", "lora_forward", "modules", "functional", "ops", "peft")


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):  # the module and every package above it, less the root
            if ".".join(parts[:end]) in known:
                edges.add(".".join(parts[:end]))
    own_packages = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 2)}
    return edges - own_packages  # a module's own packages are imported before it runs


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert f"{PACKAGE}.quantized.modules" in graph[f"{PACKAGE}.quantized"]  # the walk sees the package's imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_dense_path_imports_nothing_from_quantized():
    graph = _graph()
    dense = [m for m in graph if any(m == f"{PACKAGE}.{d}" or m.startswith(f"{PACKAGE}.{d}.") for d in DENSE_PATH)]
    assert len(dense) >= len(DENSE_PATH)
    offenders = {m: sorted(t for t in graph[m] if t.startswith(f"{PACKAGE}.quantized")) for m in dense}
    assert not any(offenders.values()), {m: t for m, t in offenders.items() if t}


def test_a_known_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
