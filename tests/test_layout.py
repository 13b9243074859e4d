"""The code's layering, read from the source: which package may import which, and no circles.

schemas < storage < transforms < flows, and training < flows: a lower package never imports a
higher one. Inside flows/, the sub-packages depend one way (build -> report, validation ->
build, corpora -> build), and no module imports a module that imports it back, counting the
imports made inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "storage", "transforms", "training", "flows")

# What each package (or flows sub-package) may import of the project, besides itself.
ALLOWED = {
    "schemas": set(),
    "storage": {"schemas"},
    "transforms": {"schemas", "storage"},
    "training": {"schemas", "storage"},
    "flows.build": {"schemas", "storage", "transforms", "flows.report"},
    "flows.validation": {"schemas", "storage", "transforms", "flows.build"},
    "flows.report": {"schemas", "storage"},
    "flows.export": {"schemas", "storage"},
    "flows.corpora": {"schemas", "storage", "transforms", "flows.build"},
    "flows": {"schemas", "storage", "transforms", "training", "flows.build", "flows.validation",
              "flows.report", "flows.export", "flows.corpora"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.split(".")[0] in PACKAGES:
                found.add(n)
    return found


def group(mod: str) -> str:
    """The unit ALLOWED speaks of: a top-level package, or a flows sub-package."""
    parts = mod.split(".")
    if parts[0] == "flows" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def test_every_import_follows_the_layering() -> None:
    bad = []
    for mod, deps in graph().items():
        g = group(mod)
        assert g in ALLOWED, f"{mod}: its package {g} has no entry in ALLOWED"
        for dep in deps:
            dg = group(dep)
            if dg != g and dg not in ALLOWED[g] and dep != "flows":
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_circle() -> None:
    g = graph()
    # Tarjan's strongly connected components: any component of two or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other: {circles}"


def test_the_checks_see_a_known_edge() -> None:
    """The graph is read for real: edges that must exist are found, so the tests above
    do not pass on an empty graph."""
    g = graph()
    assert "storage.verdict" in g["training.loop"]
    assert "flows.build.executors" in g["flows.build.ray_exec"]
    assert "schemas.text" in g["storage.readbase"] and "storage.readbase" in g["storage.readers"]
    assert len(g) > 60


def test_every_sub_package_says_what_it_holds() -> None:
    for pkg in ("flows.build", "flows.validation", "flows.report", "flows.export", "flows.corpora"):
        init = REPO / pkg.replace(".", "/") / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, \
            f"{init} needs a docstring saying what lives there and what it may import"


def test_flows_modules_stay_readable() -> None:
    """No module under flows/ over about 400 lines, unless its docstring says why."""
    long = []
    for path in sorted((REPO / "flows").rglob("*.py")):
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > 420 and "lines because" not in doc:
            long.append(f"{path.relative_to(REPO)}: {n} lines")
    assert not long, long
