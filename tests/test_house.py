"""The shape of the house: no import cycles (function-level imports included) and no function
in ptxlab/ longer than 60 lines. Both read the source with `ast`; nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ptxlab"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str) -> set[str]:
    """The ptxlab modules that module `name` imports (a package's own submodules count when
    named: `from ptxlab import tracking` is an edge to ptxlab.tracking)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        found.update(target for target in targets if target in MODULES and target != name)
    # Importing a.b.c runs a.b's __init__ first, unless that package encloses `name` (then it
    # is already being imported): an edge to every such package.
    found |= {parent for target in found for parent in _packages_above(target)
              if not (name == parent or name.startswith(parent + "."))}
    return found


def _packages_above(module: str) -> list[str]:
    """The packages enclosing `module` that ptxlab has (`ptxlab.sweep` for ptxlab.sweep.oof)."""
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts)) if ".".join(parts[:n]) in MODULES]


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    graph = {name: imported_modules(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def test_the_import_graph_finds_what_it_should():
    assert "ptxlab.metrics" in imported_modules("ptxlab.postprocess")
    assert "ptxlab.experiment" in imported_modules("ptxlab.sweep.worker")  # a function's import
    assert "ptxlab.inference" not in imported_modules("ptxlab.metrics")  # TYPE_CHECKING only
    assert "ptxlab.tracking" in imported_modules("ptxlab.evaluation")  # `from ptxlab import x`
    # importing a submodule of another package runs that package's __init__
    assert "ptxlab.sweep" in imported_modules("ptxlab.ensemble")
    assert "ptxlab.sweep" not in imported_modules("ptxlab.sweep.runner")


def test_no_import_cycles():
    assert import_cycles() == []


def function_lengths() -> dict[str, int]:
    lengths = {}
    for path in MODULES.values():
        where = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{where}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_is_longer_than_60_lines():
    too_long = {name: n for name, n in function_lengths().items() if n > MAX_FUNCTION_LINES}
    assert too_long == {}


def readme_tree() -> set[str]:
    """The files the README's Development section lists under ptxlab/, as paths."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Development", 1)[1].split("```", 2)[1]
    listed, folders = set(), []  # folders: (indent, name) of the folders enclosing this line
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        folders = [(depth, name) for depth, name in folders if depth < indent]
        head = line.split()[0]
        if head.endswith("/"):
            folders.append((indent, head.rstrip("/")))
            continue
        if not folders or folders[0][1] != "ptxlab":
            continue
        prefix = "/".join(name for _, name in folders)
        listed |= {f"{prefix}/{token}" for token in line.split()
                   if token.endswith(".py") and token.replace(".py", "").isidentifier()}
    return listed


def test_the_readme_shows_the_house_as_it_is():
    tree = {path.relative_to(PACKAGE.parent).as_posix() for path in MODULES.values()}
    listed = readme_tree()
    assert tree - listed == set(), "add these to README.md's Development section"
    assert listed - tree == set(), "README.md's Development section lists files that are gone"
