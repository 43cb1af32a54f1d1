"""Map autoseg's imports, sizes and long signatures, so a refactor can check its arrows run down the pipeline.

Run as ``python scripts/code_map.py [--json] [--root REPO]``. Stdlib only: it parses the source and
imports nothing from autoseg. ``tests/test_architecture.py`` loads these functions by path.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "autoseg"
MAX_PARAMS = 10

# Lowest layer first; a module may import from its own layer or any earlier one. A module that no
# entry covers is reported, so a new module gets a row here. Three places differ from the stage
# order in STYLE.md because the code (rightly) says so: the planner asks the network its memory cost
# (network before planning), export applies postprocessing rules (postprocessing/evaluation before
# inference), and validation predicts through inference (inference before training).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("autoseg", "autoseg.atomic", "autoseg.workspace", "autoseg.parallel", "autoseg.device",
              "autoseg.errors")),
    ("dataset", ("autoseg.dataset",)),
    ("fingerprint", ("autoseg.fingerprint",)),
    ("network", ("autoseg.network",)),
    ("planning", ("autoseg.planning",)),
    ("preprocessing", ("autoseg.preprocessing", "autoseg.plan_workspace")),
    ("model files", ("autoseg.model_files",)),
    ("postprocessing/evaluation", ("autoseg.evaluation", "autoseg.postprocessing")),
    ("inference", ("autoseg.inference",)),
    ("training", ("autoseg.training",)),
    ("crossval", ("autoseg.crossval",)),
    ("quantization", ("autoseg.quantization",)),
    ("model_archive", ("autoseg.model_archive",)),
    ("python api", ("autoseg.api",)),
    ("cli", ("autoseg.cli", "autoseg.__main__")),  # __main__: `python -m autoseg`, the command line's other door
]
ENTRY_POINTS = ("autoseg.__main__",)  # may import autoseg.cli; nothing else may

Graph = dict[str, set[str]]


def inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def source_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not ``__init__``)."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _resolve(name: str, known: set[str]) -> str:
    """The longest known module that `name` lies in (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in known), name)


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules imported anywhere in `tree`, function bodies included; relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name, known) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            found.update(_resolve(f"{base}.{a.name}" if base else a.name, known) for a in node.names)
    return {m for m in found if inside(m, PACKAGE) and m != module}


def import_graph(root: Path = ROOT) -> Graph:
    files = source_files(root)
    return {m: imports_of(ast.parse(p.read_text(encoding="utf-8"), str(p)), m, p.name == "__init__.py",
                          set(files))
            for m, p in files.items()}


def layer_of(module: str) -> int | None:
    """Index into LAYERS by the longest matching prefix; the bare package name matches only itself."""
    matches = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if module == p or (p != PACKAGE and inside(module, p))]
    return max(matches)[1] if matches else None


def layer_name(module: str) -> str:
    index = layer_of(module)
    return "not in LAYERS" if index is None else LAYERS[index][0]


def upward_imports(graph: Graph) -> list[tuple[str, str]]:
    """(importer, imported) pairs that point up the layer table or involve a module it does not cover."""
    return [(a, b) for a, targets in sorted(graph.items()) for b in sorted(targets)
            if layer_of(a) is None or layer_of(b) is None or layer_of(b) > layer_of(a)]


def imports_between(graph: Graph, importer_prefix: str, imported_prefix: str) -> list[tuple[str, str]]:
    return [(a, b) for a, targets in sorted(graph.items()) if inside(a, importer_prefix)
            for b in sorted(targets) if inside(b, imported_prefix)]


def functions(root: Path = ROOT) -> list[dict]:
    """Every function and method: qualified name, file:line, length in lines, parameters (not self/cls)."""
    out: list[dict] = []

    def visit(node: ast.AST, prefix: str, rel: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", rel)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x]
                if isinstance(node, ast.ClassDef) and params[:1] in (["self"], ["cls"]):
                    params = params[1:]
                out.append({"name": prefix + child.name, "where": f"{rel}:{child.lineno}",
                            "lines": child.end_lineno - child.lineno + 1, "params": len(params)})
                visit(child, f"{prefix}{child.name}.", rel)

    for path in source_files(root).values():
        visit(ast.parse(path.read_text(encoding="utf-8")), "", path.relative_to(root).as_posix())
    return out


def code_map(root: Path = ROOT, top: int = 15) -> dict:
    graph = import_graph(root)
    funcs = functions(root)
    sizes = {p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in source_files(root).values()}
    return {
        "graph": {m: sorted(t) for m, t in sorted(graph.items())},
        "upward_imports": [{"importer": a, "imported": b, "layers": [layer_name(a), layer_name(b)]}
                           for a, b in upward_imports(graph)],
        "inference_imports_training": imports_between(graph, "autoseg.inference", "autoseg.training"),
        "imports_of_cli": [a for a, targets in sorted(graph.items())
                           if "autoseg.cli" in targets and a not in ENTRY_POINTS],
        "module_lines": dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "largest_functions": sorted(funcs, key=lambda f: -f["lines"])[:top],
        "many_parameters": sorted((f for f in funcs if f["params"] > MAX_PARAMS), key=lambda f: -f["params"]),
    }


def print_report(m: dict) -> None:
    graph = m["graph"]
    packages = {p for p in graph if any(other.startswith(p + ".") for other in graph)}
    group_of = {mod: mod if mod in packages else mod.rsplit(".", 1)[0] for mod in graph}
    print("# Import graph: the autoseg modules each module imports (function bodies included)")
    last = None
    for module in sorted(graph, key=lambda mod: (group_of[mod], mod)):
        if group_of[module] != last:
            last = group_of[module]
            print(f"\n[{last}]")
        print(f"  {module} -> {', '.join(graph[module]) or '-'}")
    print(f"\n# Imports against the layer order ({' < '.join(name for name, _ in LAYERS)})")
    for u in m["upward_imports"]:
        print(f"  {u['importer']} ({u['layers'][0]}) -> {u['imported']} ({u['layers'][1]})")
    cli = m["imports_of_cli"]
    print(f"  inference -> training: {len(m['inference_imports_training'])}; "
          f"modules importing autoseg.cli: {len(cli)}{' (' + ', '.join(cli) + ')' if cli else ''}")
    print(f"\n# Module sizes (lines; {len(m['module_lines'])} modules, {sum(m['module_lines'].values())} in all)")
    for path, n in m["module_lines"].items():
        print(f"  {n:5d}  {path}")
    print(f"\n# The {len(m['largest_functions'])} largest functions/methods (lines)")
    for f in m["largest_functions"]:
        print(f"  {f['lines']:5d}  {f['name']}  {f['where']}")
    print(f"\n# Functions with more than {MAX_PARAMS} parameters: {len(m['many_parameters'])}")
    for f in m["many_parameters"]:
        print(f"  {f['params']:5d}  {f['name']}  {f['where']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the map as JSON")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root holding autoseg/")
    args = parser.parse_args(argv)
    m = code_map(args.root)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print_report(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
