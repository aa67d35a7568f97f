"""The package's shape: data flows one way (no module imports one that imports it back), and the
installed package never imports plotting or benchmark code."""
import ast
from pathlib import Path

PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("subfit", "subfit_kernels")]


def _imports() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[module] = found
    return {m: {i for i in found if i in graph and i != m} for m, found in graph.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    for start in graph:
        stack, seen = list(graph[start]), set()
        while stack:
            module = stack.pop()
            assert module != start, f"{start} imports itself back through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                stack += graph[module]


def test_package_never_imports_plotting_or_benchmarks():
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            text = path.read_text()
            assert "matplotlib" not in text and "import bench" not in text, path
