"""The shape of the code: imports flow one way down the layers, no import circles between project modules,
and no module over 700 lines.

Every module under `align/` and `chatml/` is read with `ast` (not imported), and every import of a
project module counts wherever it is written: at the top, inside a function (a "lazy" import is still a
dependency, and the usual way a circle gets hidden), under `if TYPE_CHECKING:`. Nothing is excluded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "chatml")
MAX_LINES = 700


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the project packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to: itself, or its longest dotted prefix that is a module (an
    imported attribute, e.g. `align.rollout.RolloutBatch`); None outside the project."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file (top level, functions, classes)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up `level - 1` more
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from align import rollout` imports the module align.rollout.batch; `from align.rollout.batch import X`
            # imports align.rollout.batch (X is an attribute, or a submodule when align.rollout.batch is a package).
            names = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each is a set of modules
    that all import each other, directly or through the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not a cycle")  # unreachable for a real component


def describe_circles(graph: dict[str, set[str]]) -> list[str]:
    """Each circle as one shortest path through it, and every module caught in it."""
    return [
        " -> ".join(_cycle_through(c, graph)) + f"  (modules in this circle: {', '.join(sorted(c))})"
        for c in import_circles(graph)
    ]


def test_no_import_cycles():
    circles = describe_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_module_over_700_lines():
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_checks_see_what_they_must():
    """The graph walker finds function-level imports and relative imports, and the cycle finder names a
    circle: so a passing test above means no circle, not a blind walker."""
    graph = import_graph()
    assert {"align", "chatml", "align.train.sft", "align.rollout.engines"} <= set(graph)
    assert "align.rollout.static" in graph["align.rollout.engines"]  # imported inside engine_class
    assert "align.train.sft" in graph["align.pipeline.run"]  # imported inside default_runners
    toy = {"a": {"b", "x"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "x": {"a"}}
    assert describe_circles(toy) == ["a -> x -> a  (modules in this circle: a, b, c, x)"]
    assert describe_circles({"a": {"b"}, "b": set()}) == []


# The flow, top to bottom (README "Layout"): a module imports only from its own layer or the ones below. A
# prefix names a module and everything under it; the longest matching prefix decides a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("pipeline", ("align.pipeline",)),
    ("train", ("align.train",)),
    ("evaluation", ("align.evaluation",)),
    ("reward", ("align.reward",)),
    ("rollout, models, ptx", ("align.rollout", "align.models", "align.ptx")),
    ("data, assets, fused log-probs", ("align.data", "align.assets", "align.fused_logprobs")),
    (
        "foundations",
        (
            "chatml", "align", "align.tasks", "align.rl_math", "align.losses", "align.attention", "align.packing",
            "align.config", "align.config_loader", "align.checkpoint", "align.tracking", "align.hf_compat",
        ),
    ),
]  # fmt: skip


def layer_of(module: str) -> int:
    """Index into LAYERS (0 = top) of `module`, by its longest matching prefix; KeyError if none."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (i, len(prefix))
    if best is None:
        raise KeyError(
            f"{module} is in no layer of tests/test_architecture.py::LAYERS; add it where it belongs"
        )
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a layer above the importer's, as "importer (layer) imports target (layer)"."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) < layer_of(module):
                found.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    return found


def test_imports_flow_one_way_down_the_layers():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_the_layer_check_names_an_upward_import():
    graph = {
        "align.rollout.static": {"align.train.ppo", "align.hf_compat"},
        "align.train.ppo": {"align.rollout"},
    }
    assert upward_imports(graph) == [
        "align.rollout.static (rollout, models, ptx) imports align.train.ppo (train)"
    ]
    assert layer_of("align.reward") == 3 and layer_of("align.rollout.shared_prefix") == 4
