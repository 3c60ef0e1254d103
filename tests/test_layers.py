"""The import graph of the installed package: layers import only downward, and nothing imports in a cycle.

Layers, lowest first (DESIGN.md): core; trainer and runtime (side by side, neither knows the
other); exporter (trainer -> bundle, checked with the runtime) and server (runtime -> HTTP);
experiments (may use every layer below); the CLI and the demo on top.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

LAYERS = {
    "quorum.core": 0,
    "quorum.trainer": 1,
    "quorum.runtime": 1,
    "quorum.exporter": 2,
    "quorum.server": 2,
    "quorum.experiments": 3,
    "app": 4,  # quorum.cli, quorum.commands, quorum.demo, quorum.__main__
    "quorum": 0,  # the root package's __init__: the version, nothing else
}
APP = ("quorum.cli", "quorum.commands", "quorum.demo", "quorum.__main__")


def _package(module: str) -> str:
    """The layer key of a module: its subpackage, "app" for the CLI's modules, "quorum" for the root."""
    top = ".".join(module.split(".")[:2])
    if top in APP:
        return "app"
    return top if top in LAYERS else "quorum"


def _walk(name: str, folder: Path, found: dict[str, Path]) -> None:
    """A package's modules by file, importing none of them (the serving venv has no torch)."""
    found[name] = folder / "__init__.py"
    for info in pkgutil.iter_modules([str(folder)]):
        if info.ispkg:
            _walk(f"{name}.{info.name}", folder / info.name, found)
        else:
            found[f"{name}.{info.name}"] = folder / f"{info.name}.py"


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by name, with its source file (without importing them:
    the subpackages live in their own top-level folders, mapped by setuptools' package-dir)."""
    found: dict[str, Path] = {}
    for pkg in ["quorum", *(p for p in LAYERS if p.startswith("quorum."))]:
        spec = importlib.util.find_spec(pkg)  # imports `quorum` only, to find each top-level folder
        assert spec is not None and spec.submodule_search_locations, pkg
        _walk(pkg, Path(next(iter(spec.submodule_search_locations))), found)
    return found


def _outside_functions(tree: ast.AST) -> list[ast.AST]:
    """Nodes that run when the module is imported, or that type checkers follow (`if TYPE_CHECKING:`)."""
    out, todo = [], list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """The quorum modules that `module` imports (anywhere in the file, or only at its top level)."""
    tree = ast.parse(path.read_text())
    nodes = _outside_functions(tree) if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative
                base = ".".join([*module.split(".")[: -node.level], node.module])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in names if n == "quorum" or n.startswith("quorum.")}


def test_every_subpackage_has_a_layer() -> None:
    modules = _modules()
    assert {"quorum.core.tasks", "quorum.runtime.engine", "quorum.experiments.robustness"} <= set(modules)
    unplaced = sorted(m for m in modules if _package(m) == "quorum" and m != "quorum")
    assert not unplaced, f"modules outside every layer: {unplaced}; add them to LAYERS"


def test_no_module_imports_from_a_layer_above_or_beside_it() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        mine = _package(name)
        for target in _imports(name, path, top_level_only=False):
            theirs = _package(target)
            if theirs == mine or theirs == "quorum":
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {
        name: {t for t in _imports(name, path, top_level_only=True) if t in modules and t != name}
        for name, path in modules.items()
    }
    # A package's __init__ that re-exports its own modules is not a cycle with them.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_serving_side_never_imports_torch_at_module_level() -> None:
    modules = _modules()
    serving = [n for n in modules if _package(n) in ("quorum.core", "quorum.runtime", "quorum.server")]
    heavy = []
    for name in serving:
        tree = ast.parse(modules[name].read_text())
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                heavy += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("torch", "torchvision", "onnx")]
    assert not heavy, heavy


def _import_time_names(module: str, path: Path) -> set[str]:
    """Every module name `module` imports when it is imported: not in functions, not under `if TYPE_CHECKING:`."""
    out, todo = set(), list(ast.iter_child_nodes(ast.parse(path.read_text())))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if not node.level else ".".join([*module.split(".")[: -node.level], node.module])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return out


def test_the_gateway_loads_neither_onnxruntime_nor_torch() -> None:
    """What `quorum gateway` imports, followed through the package: no ONNX Runtime, no torch."""
    modules = _modules()
    seen, todo, heavy = set(), ["quorum.server.main", "quorum.server.gateway"], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules]  # packages
        for target in _import_time_names(name, modules[name]):
            if target.split(".")[0] in ("onnxruntime", "torch", "torchvision", "onnx"):
                heavy.append(f"{name} imports {target}")
            elif target in modules:
                todo.append(target)
    assert "quorum.server.shards" in seen and "quorum.runtime.plan" in seen
    assert not heavy, heavy
