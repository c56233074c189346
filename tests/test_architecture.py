"""The import direction of docs/architecture.md: a lower layer never imports a higher one.

Every module of agpt_jax and converters is placed in LAYERS; an import (at module level or
inside a function: both are dependencies) may only go to the same layer or a lower one, the
imports among all modules have no cycle, and the package never imports scripts, benchmarks or
tests. A new module that is not in LAYERS fails here until it is placed (and documented).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is that of the longest prefix listed (agpt_jax.data covers
# agpt_jax.data.blend). Keep in step with the table in docs/architecture.md.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Leaves: no other module of the project.
    ("agpt_jax.cli", "agpt_jax.compat", "agpt_jax.hostmem", "agpt_jax.paths", "agpt_jax.xpu",
     "agpt_jax.megatron_flags", "agpt_jax.metrics", "agpt_jax.recipes", "agpt_jax.schedules",
     "agpt_jax.optim", "agpt_jax.sharding", "agpt_jax.data"),
    # What the platform is and can do; meshes and launchers.
    ("agpt_jax.runtime",),
    # The model and its attention kernels.
    ("agpt_jax.attention", "agpt_jax.model"),
    # The config, the step, the agpt-jax checkpoint format.
    ("agpt_jax.config", "agpt_jax.train", "agpt_jax.checkpoint",
     "agpt_jax.evaluate"),
    # What runs: the training loop and the 7B planner.
    ("agpt_jax.start", "agpt_jax.run_files", "agpt_jax.loop", "agpt_jax.plan"),
    # The border with Megatron / DeepSpeed: every foreign name and layout.
    ("converters",),
)
FORBIDDEN_ROOTS = ("scripts", "benchmarks", "tests")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in ("agpt_jax", "converters"):
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _imported(name: str, path: pathlib.Path) -> set[str]:
    """Dotted names `name` imports (for `from a import b`: a, and a.b in case b is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def _resolve(dotted: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The project module a dotted import name refers to (the longest module prefix), or None
    for a third-party name or a package root."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules and candidate not in ("agpt_jax",):
            return candidate
    return None


def _layer(module: str) -> int | None:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    return layer


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {_resolve(d, modules) for d in _imported(name, path)}
        # A module importing from its own package (`from agpt_jax.checkpoint import layout`
        # inside agpt_jax/checkpoint/) runs while that package's __init__ is already loading:
        # an edge to the sibling, not to the package.
        graph[name] = {t for t in targets
                       if t is not None and t != name and not name.startswith(t + ".")}
    return graph


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m != "agpt_jax" and _layer(m) is None]
    assert not missing, (f"place these modules in LAYERS (tests/test_architecture.py) and in "
                         f"docs/architecture.md: {missing}")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        if module == "agpt_jax":
            continue
        for t in sorted(targets):
            if _layer(t) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {t} (layer {_layer(t)})")
    return wrong


def test_imports_go_down_or_sideways():
    wrong = _upward(_graph())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_the_package_never_imports_scripts_benchmarks_or_tests():
    modules = _modules()
    wrong = [(name, d) for name, path in modules.items() for d in _imported(name, path)
             if d.split(".")[0] in FORBIDDEN_ROOTS]
    assert not wrong, wrong


def test_the_check_refuses_an_upward_import():
    # The graph of today with the two imports the layering exists to prevent added.
    graph = _graph()
    graph["agpt_jax.runtime.mesh"] = graph["agpt_jax.runtime.mesh"] | {"agpt_jax.loop"}
    graph["agpt_jax.loop"] = graph["agpt_jax.loop"] | {"converters.universal"}
    assert _upward(graph) == [
        "agpt_jax.loop (layer 4) imports converters.universal (layer 5)",
        "agpt_jax.runtime.mesh (layer 1) imports agpt_jax.loop (layer 4)"]


def test_a_module_over_400_lines_says_why():
    # One idea per module: past ~400 lines a module either splits or says at its top why not.
    long = []
    for path in sorted([*ROOT.glob("agpt_jax/**/*.py"), *ROOT.glob("converters/*.py"),
                        *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 400 and "Over 400 lines on purpose" not in doc:
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, long
