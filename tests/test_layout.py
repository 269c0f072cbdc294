"""The house follows the lineage: imports run one way, stage by stage, with no circle.

Every ``import``/``from ... import`` in the three packages is read from the source (module
level and inside functions alike, so a lazy import cannot hide a violation) and checked
against the rules written in docs/architecture.md:

* ``curation`` never imports dagster, ``assets`` or ``resources``; ``resources`` never
  imports ``assets``.
* Inside ``curation``, a stage imports only from itself, earlier stages and the shared base
  (``storage``, ``engine``): ingest < embed < select < train < evaluate.
* No module imports another that (directly or not) imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("curation", "assets", "resources")
BASE = ("storage", "engine")
STAGES = ("ingest", "embed", "select", "train", "evaluate")
ALLOWED_IN_CURATION = {
    # package: the curation packages it may import (besides itself)
    "storage": set(),
    "engine": {"storage"},
    **{s: {*BASE, *STAGES[:i]} for i, s in enumerate(STAGES)},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of every module imported anywhere in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    g: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports_of(path, name):
            # resolve to the longest known module name that prefixes the import
            parts = imp.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in mods:
                    if cand != name:
                        targets.add(cand)
                    break
        g[name] = targets
    g["__external__"] = set()
    return g


def external_imports(name: str, path: Path) -> set[str]:
    return {i.split(".")[0] for i in imports_of(path, name)}


def test_every_curation_module_lives_in_a_stage_or_the_base():
    mods = all_modules()
    loose = [n for n, p in mods.items() if n.startswith("curation.") and n.count(".") == 1 and p.name != "__init__.py"]
    assert loose == [], f"modules outside the stage packages: {loose}; expected curation.<{'|'.join(BASE + STAGES)}>.<module>"
    packages = {n.split(".")[1] for n in mods if n.startswith("curation.")}
    assert packages == set(BASE + STAGES)


def test_curation_never_imports_dagster_assets_or_resources():
    bad = {
        n: sorted(external_imports(n, p) & {"dagster", "assets", "resources"})
        for n, p in all_modules().items()
        if n.split(".")[0] == "curation"
    }
    bad = {n: v for n, v in bad.items() if v}
    assert bad == {}


def test_resources_never_import_assets():
    bad = {n: "assets" for n, p in all_modules().items() if n.startswith("resources") and "assets" in external_imports(n, p)}
    assert bad == {}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "curation" and len(parts) > 1 else None


def stage_violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in g.items():
        s = stage_of(src)
        if s is None:
            continue
        for t in targets:
            ts = stage_of(t)
            if ts is not None and ts != s and ts not in ALLOWED_IN_CURATION[s]:
                out.append(f"{src} imports {t}: {s} may import only {sorted(ALLOWED_IN_CURATION[s])}")
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_curation_stages_import_one_way():
    assert stage_violations(graph()) == []


def test_no_import_circle():
    # a package's __init__ re-exporting its children is not a circle of the code's own making
    g = {k: {t for t in v if not (k == t.rsplit(".", 1)[0] and k in ("curation",))} for k, v in graph().items()}
    assert cycles(g) == []


@pytest.mark.parametrize(
    "graph_, expect",
    [
        ({"curation.select.recipes": {"curation.train.trainer"}, "curation.train.trainer": set()}, "select may import only"),
        ({"curation.storage.lake": {"curation.ingest.ids"}, "curation.ingest.ids": set()}, "storage may import only"),
        ({"curation.ingest.shards": {"curation.storage.lake"}, "curation.storage.lake": set()}, None),
    ],
)
def test_the_stage_rule_catches_an_import_against_the_stages(graph_, expect):
    v = stage_violations(graph_)
    assert (expect in v[0]) if expect else v == []


def test_the_cycle_finder_catches_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
