"""The package's modules import in layers: no module imports one that imports it back, directly or through
others. The graph is read from the source (every import statement, those inside functions too), so a new
module or import is checked without listing it here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unet_dcnv4"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package's name is its __init__'s)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.with_suffix("").relative_to(package.parent).parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` (at `path`) imports anywhere in its source."""
    # The package a relative import starts from: the module's own for an __init__, else its parent's.
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module] if node.module else
                            here[:len(here) - node.level + 1]) if node.level else node.module
            # `from . import x` and `from .ops import reference` name modules; `from .x import f` names x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` imports a, a.b and a.b.c: the deepest module of the package counts.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph(PACKAGE)
    assert {"unet_dcnv4.training", "unet_dcnv4.sampling", "unet_dcnv4.common"} <= graph.keys()
    assert "unet_dcnv4.common" in graph["unet_dcnv4.training"]  # the graph sees imports
    cycles = import_cycles(graph)
    assert not cycles, f"groups of modules that import each other (directly or through others): {cycles}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_the_graph_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import f\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/sub/__init__.py": "from ..d import g\n",
        "pkg/sub/e.py": "from .. import d\nfrom pkg.sub import e\n",
        "pkg/d.py": "import os\nfrom pkg.a import f\n",
    })
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.d"} and graph["pkg.sub.e"] == {"pkg.d"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (package / "c.py").write_text("import os\n")
    assert import_cycles(import_graph(package)) == []


@pytest.mark.parametrize("module", ["common", "_checks", "checkpoints", "config", "intervals", "progress", "timing"])
def test_the_bottom_modules_import_nothing_of_the_package(module):
    assert import_graph(PACKAGE)[f"unet_dcnv4.{module}"] == set()
