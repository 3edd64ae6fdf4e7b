"""No import cycles among the project's own modules (studio/, models/, lab/).

Every import counts, lazy ones inside functions included: a cycle hidden behind a lazy import
still ties the two modules together (neither can be read, tested or moved without the other)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("studio", "models", "lab")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT, packages=PACKAGES) -> dict:
    """module name -> file, for every .py file of the packages."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict) -> set:
    """The project modules a file imports (at top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()

    def add(target: str):
        # the longest prefix that is one of our modules (`import studio.world.render` -> that module)
        parts = target.split(".")
        for n in range(len(parts), 0, -1):
            cand = ".".join(parts[:n])
            if cand in modules:
                if cand != name:
                    out.add(cand)
                return

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # `from studio import editing` imports the module studio.editing
                full = f"{base}.{a.name}"
                add(full if full in modules else base)
    return out


def find_cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict:
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert "studio.pipeline" in graph and graph["studio.pipeline"]  # the walk sees the modules
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_and_relative_cycles(tmp_path):
    pkg = tmp_path / "studio"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import numpy\nfrom studio import b\n")
    (pkg / "b.py").write_text("def f():\n    from studio.a import g\n")  # lazy: still a cycle
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..sub import x\n")  # relative, via the package
    (pkg / "d.py").write_text("from studio import sub\n")  # d -> sub: no cycle
    graph = import_graph(tmp_path, ("studio",))
    assert graph["studio.a"] == {"studio.b"} and graph["studio.d"] == {"studio.sub"}
    assert find_cycles(graph) == [["studio.a", "studio.b"], ["studio.sub", "studio.sub.c"]]
