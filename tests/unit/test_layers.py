"""The package's import graph, read with ast (nothing is executed): dependencies run one way, there are no cycles,
and a project import inside a function states why (`# lazy: ...`, an optional or slow dependency).

Layers, lowest first: models <- data <- train (the engine) <- callbacks <- train.ops (the operations: CLIs,
launches, sweeps, tracking, reports) <- ui (foundry-ui, the web app over them). A module imports its own layer or
lower ones only.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data", "train", "callbacks", "ui")


def layer(module: str) -> int:
    if module.startswith("train.ops"):
        return 4
    return {"models": 0, "data": 1, "train": 2, "callbacks": 3, "ui": 5}[module.split(".")[0]]


def modules() -> dict[str, Path]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    out = {}
    for f in files:
        if f.split("/")[0] in PACKAGES and (ROOT / f).is_file():
            out[f[:-3].replace("/", ".").removesuffix(".__init__")] = ROOT / f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import of `path`."""
    source = path.read_text()
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.append((name, node.lineno, id(node) in in_function))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {m: [i for i in imports(p, known) if i[0] != m] for m, p in known.items()}


def test_dependencies_run_one_way():
    upward = [f"{m}:{line} imports {dep}" for m, deps in graph().items() for dep, line, _ in deps
              if layer(dep) > layer(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = {m: sorted({d for d, _, _ in deps}) for m, deps in graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _explained(lines: list[str], line: int) -> bool:
    """`# lazy:` on the import's line, or on the comment line above its block of imports."""
    i = line - 1
    if "# lazy:" in lines[i]:
        return True
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
        i -= 1
    return i > 0 and "# lazy:" in lines[i - 1]


def test_project_imports_inside_functions_state_why():
    known = modules()
    unexplained = []
    for m, path in known.items():
        lines = path.read_text().splitlines()
        for dep, line, inside in imports(path, known):
            if inside and dep != m:
                if not _explained(lines, line):
                    unexplained.append(f"{m}:{line} imports {dep} inside a function")
    assert not unexplained, ("hoist these imports to the top, or say why they must wait with `# lazy: <reason>`:\n"
                             + "\n".join(unexplained))
