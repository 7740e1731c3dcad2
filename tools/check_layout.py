"""The layout rules of ``src/pbrf`` that a linter cannot hold (``make test`` runs this).

1. Imports point downward only. Layers, low to high: the library (``pbrf.*`` outside
   ``experiment``) ← ``experiment.config`` ← ``experiment.analysis`` ← ``experiment.report`` ←
   ``experiment.run`` ← ``experiment.studies`` | ``experiment.bench`` ← ``pbrf.cli``. A module may
   import its own package's modules and any lower layer; studies and bench do not import each
   other. ``pbrf/__init__.py`` (the public API) and ``pbrf/experiment/__init__.py`` are facades
   that may re-export from any layer.
2. No import cycle between modules.
3. Imports at module level only, except the optional packages ``ray`` and ``kronfluence``.
4. No private name (``_name``) of one pbrf module is used in another, imported or as
   ``module._name``.
5. No function longer than 60 lines (``def`` to its last line), except declarative tables
   (:data:`LONG_ALLOWED`).

Usage: ``python tools/check_layout.py [SRC_DIR]`` (default ``src``); prints one line per
violation and exits 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

OPTIONAL = {"ray", "kronfluence"}
MAX_LINES = 60
#: Functions allowed to be longer: declarative tables (the argparse parser).
LONG_ALLOWED = {"pbrf.cli.build_parser"}
#: Layer of each part, low to high; modules not listed are the library (layer 0).
LAYERS = {
    "pbrf.experiment": 1,
    "pbrf.experiment.config": 1,
    "pbrf.experiment.analysis": 2,
    "pbrf.experiment.report": 3,
    "pbrf.experiment.run": 4,
    "pbrf.experiment.studies": 5,
    "pbrf.experiment.bench": 5,
    "pbrf.cli": 6,
}
#: Package facades that re-export their parts (``pbrf``, the public API; ``pbrf.experiment``).
FACADES = {"pbrf", "pbrf.experiment"}


def part(module: str) -> str:
    """The layer-bearing part a module belongs to (the longest prefix in :data:`LAYERS`)."""
    best = ""
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best or "pbrf"


def layer(module: str) -> int:
    return LAYERS.get(part(module), 0)


def modules(src: Path) -> dict[str, Path]:
    """``{dotted name: path}`` of every module under ``src/pbrf``."""
    out = {}
    for path in sorted((src / "pbrf").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(mods: dict, current: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, str]]:
    """``(module, imported name or "")`` pairs of an import statement, resolved to modules."""
    if isinstance(node, ast.Import):
        return [(a.name, "") for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = current.split(".")
        if mods[current].name != "__init__.py":
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
    return [(f"{base}.{a.name}", "") if f"{base}.{a.name}" in mods else (base, a.name)
            for a in node.names]


def _function_lines(tree: ast.Module, module: str):
    """``(qualified name, lines, lineno)`` of every function and method."""
    stack = [(tree, module)]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child.end_lineno - child.lineno + 1, child.lineno
                stack.append((child, name))


def _check_module(mods: dict, name: str, path: Path, edges: dict) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    bound: dict[str, str] = {}  # local alias -> pbrf module it names
    errors = []
    where = f"{path}"
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        targets = _target(mods, name, node)
        for target, imported in targets:
            root = target.split(".")[0]
            if id(node) not in top and root not in OPTIONAL:
                errors.append(f"{where}:{node.lineno}: import of {target} inside a function "
                              "(only ray and kronfluence may be imported lazily)")
            if root != "pbrf":
                continue
            if imported.startswith("_") and not imported.startswith("__"):
                errors.append(f"{where}:{node.lineno}: private name {imported} of {target} "
                              "used outside its module")
            if target in mods and target != name:
                edges.setdefault(name, set()).add(target)
                errors += _direction(name, target, f"{where}:{node.lineno}")
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pbrf") and a.name in mods:
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else "pbrf"
        else:
            for (target, imported), a in zip(targets, node.names):
                if not imported and target in mods:
                    bound[a.asname or a.name] = target
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and node.attr.startswith("_")
                and not node.attr.startswith("__") and bound[node.value.id] != name):
            errors.append(f"{where}:{node.lineno}: private name {node.attr} of "
                          f"{bound[node.value.id]} used outside its module")
    for fn, lines, lineno in _function_lines(tree, name):
        if lines > MAX_LINES and fn not in LONG_ALLOWED:
            errors.append(f"{where}:{lineno}: {fn} is {lines} lines (at most {MAX_LINES})")
    return errors


def _direction(src: str, dst: str, where: str) -> list[str]:
    if src in FACADES or part(src) == part(dst):
        return []
    if layer(dst) < layer(src):
        return []
    return [f"{where}: {src} (layer {part(src)}) imports {dst} (layer {part(dst)}): imports "
            "must point downward"]


def _cycles(edges: dict) -> list[str]:
    """One line per import cycle (strongly connected component of more than one module)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append("import cycle: " + " -> ".join(sorted(comp)))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check(src: Path) -> list[str]:
    """Every violation of the layout rules under ``src/pbrf``, one line each."""
    mods = modules(src)
    edges: dict[str, set] = {}
    errors = []
    for name, path in mods.items():
        errors += _check_module(mods, name, path, edges)
    facade_free = {k: {d for d in v if d not in FACADES} for k, v in edges.items()
                   if k not in FACADES}
    return list(dict.fromkeys(errors)) + _cycles(facade_free)


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else Path("src")
    errors = check(src)
    for line in errors:
        print(line)
    if errors:
        print(f"{len(errors)} layout violation(s); see tools/check_layout.py for the rules.")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
