"""The import graph of peftfast's own modules, read from the source: it has no cycle, not even through imports made
inside functions (a lazy import that reaches up a layer is a cycle waiting for its first eager caller), and the
method registry sits at the bottom, importing nothing from peftfast.

An edge A -> B means module A imports module B (`from .x import y` is an edge to `x.y` when that is a module, else
to `x`). Imports under `if TYPE_CHECKING:` are not edges (they never run). The implicit "a submodule's package is
initialised first" is not an edge either: that one is how every package works.
"""

from __future__ import annotations

import ast
from pathlib import Path

# Read from the checkout, without importing peftfast: these tests explain an import failure rather than suffer it.
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "peftfast"

# The modules that imported each other in a cycle before the registry got a module of its own (issue 14).
CORE_MODULES = [
    "peftfast.config",
    "peftfast.mapping",
    "peftfast.peft_model",
    "peftfast.registry",
    "peftfast.tuners.tuners_utils",
    "peftfast.utils.save_and_load",
    "peftfast.bench",
    "peftfast.cli",
]


# The layers above peft_model.py (ARCHITECTURE.md): nothing in the tuners, utils, ops, config or the registry may
# import them. mapping.py is one: get_peft_model builds a PeftModel.
UPPER_LAYERS = (
    "peftfast.auto",
    "peftfast.bench",
    "peftfast.cli",
    "peftfast.helpers",
    "peftfast.integrations",
    "peftfast.mapping",
    "peftfast.mapping_func",
    "peftfast.peft_model",
    "peftfast.speedup",
)
LOWER_LAYERS = ("peftfast.tuners", "peftfast.utils", "peftfast.ops", "peftfast.config", "peftfast.registry")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("peftfast", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported peftfast module, whether the import is inside a function) for every import of `name`'s source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, in_function) for alias in node.names if alias.name.split(".")[0] == "peftfast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "peftfast":
                for alias in node.names:
                    candidate = f"{module}.{alias.name}"
                    found.append((candidate if candidate in known else module, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _graph() -> dict[str, list[tuple[str, bool]]]:
    modules = _modules()
    known = set(modules)
    # peftfast.kernels is installed from kernels/ and imports nothing of peftfast (ARCHITECTURE.md): not a node.
    return {
        name: [(target, lazy) for target, lazy in _imports(name, path, known) if target in known]
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, list[tuple[str, bool]]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target, _ in graph[node]:
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reads_the_imports_it_should():
    graph = _graph()
    assert set(CORE_MODULES) <= set(graph)
    assert ("peftfast.registry", False) in graph["peftfast.config"]
    assert ("peftfast.peft_model", False) in graph["peftfast.mapping"]
    # A function-level import is an edge too: this one (kept for transformers' Trainer patching) is read as lazy.
    assert ("peftfast.peft_model", True) in graph["peftfast.integrations.transformers"]
    # A cycle made of such edges would be found.
    assert _find_cycle({"a": [("b", False)], "b": [("a", True)]}) == ["a", "b", "a"]


def test_no_import_cycle_in_peftfast():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_modules_import_nothing_lazily():
    graph = _graph()
    lazy = {name: [target for target, in_function in graph[name] if in_function] for name in CORE_MODULES}
    assert lazy == {name: [] for name in CORE_MODULES}


def test_the_registry_imports_nothing_from_peftfast():
    assert _graph()["peftfast.registry"] == []


def _is_in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def test_lower_layers_import_no_upper_layer():
    """A method package registers itself with `peftfast.registry.register_peft_method`, not with the re-export in
    `peftfast.mapping`: mapping imports peft_model, which imports the method packages (through peftfast.tuners), so
    that import fails with "partially initialized module 'peftfast.peft_model'"."""
    upward = {
        name: sorted({target for target, _ in edges if _is_in(target, UPPER_LAYERS)})
        for name, edges in _graph().items()
        if _is_in(name, LOWER_LAYERS)
    }
    assert {name: targets for name, targets in upward.items() if targets} == {}
