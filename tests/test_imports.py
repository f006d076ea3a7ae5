"""The package's import graph, read from the source (every import, function-level ones included): no circle, and
no module importing from a layer above its own. A new module must be given its layer here, which is where a reader
learns what it may use."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer and the ones below, never from one above.
LAYERS = {
    "foundation": ["config", "manifest", "seeding", "distribution", "metrics", "chat", "template", "shards", "model_folder",
                   "tiny_models", "sandbox", "verifiers", "hub", "explain", "tasks", "tasks.*"],
    "data and engines": ["prompts", "consistency", "stage_table", "inputs", "pins", "training", "rewards", "judge",
                         "embeddings", "lm_eval_tasks", "backends", "backends.*"],
    "stages": ["stages", "stages.*"],
    "a stage's process": ["runner", "prefork", "memory_plan"],
    "pre-flight and launching": ["preflight", "launcher", "launcher.*"],
    "orchestrator": ["round"],
    "commands": ["cli", "summary", "report"],
}


def modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / "alignment").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT / "alignment").with_suffix("").parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports (`from alignment.x import y` counts alignment.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "alignment":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.removeprefix("alignment").removeprefix(".") for n in names
                  if n.split(".")[0] == "alignment" and n.removeprefix("alignment").removeprefix(".") in known}
    return found


def layer_of(module: str) -> int:
    for i, members in enumerate(LAYERS.values()):
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return i
    raise AssertionError(f"alignment/{module.replace('.', '/')}.py has no layer: add it to LAYERS in {__file__}")


def graph() -> dict[str, set[str]]:
    mods = {m: f for m, f in modules().items() if m}  # (alignment/__init__.py imports nothing of the package)
    return {m: imports(f, set(mods)) - {m} for m, f in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while (w := stack.pop()) != v:
                on.discard(w)
                part.append(w)
            on.discard(v)
            out.append(sorted(part + [v]))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def test_the_import_graph_has_no_circle():
    assert circles(graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    names = list(LAYERS)
    upward = [f"{m} ({names[layer_of(m)]}) imports {d} ({names[layer_of(d)]})"
              for m, deps in sorted(graph().items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert upward == []


def test_the_checks_find_what_they_claim():
    """Both checks fail on the graphs they exist to refuse: a circle of three, and an import from above."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    assert layer_of("config") < layer_of("backends.hf") < layer_of("stages.sft") < layer_of("round")
    source = ROOT / "alignment" / "config.py"
    assert "round" not in imports(source, {"round"})
    assert imports(ROOT / "alignment" / "round.py", set(modules())) >= {"launcher", "preflight", "inputs"}
