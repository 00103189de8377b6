"""The package's shape, checked from the source: no module imports one that imports it back
(function-level lazy imports included), and no Python file over 500 lines.

Imports are read with `ast`, not by importing anything. An edge goes from a module to each
gptkernels module it names: `import a.b` -> a.b; `from a import b` -> a.b when that is a
module of the package, else a (unless a is a package whose __init__ does not bind b: then b
is a compiled submodule such as gptkernels._C, a leaf); relative imports are resolved against
the package. The parent
packages Python initialises on the way (importing a.b.c first runs a/__init__ and a/b/__init__)
are not edges: a package's __init__ re-exporting its submodules would otherwise always read as
a circle, and Python handles exactly that case (the parent is already initialising).
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "gptkernels")
MAX_LINES = 500


def package_modules() -> dict:
    """{dotted module name: file path} for every .py file under gptkernels/."""
    mods = {}
    for root, dirs, files in os.walk(PKG):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mods[".".join(parts)] = path
    return mods


def names_bound_by(path: str) -> set:
    """Names a package's __init__ binds at top level (imports, defs, assignments)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return out


def imports_of(name: str, path: str, mods: dict) -> set:
    is_pkg = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):  # every import, at module level or inside a function
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in mods:
                    out.add(sub)
                elif mod in mods and mods[mod].endswith("__init__.py") and a.name not in names_bound_by(mods[mod]):
                    pass  # a submodule that is not Python source (the compiled gptkernels._C): a leaf
                else:
                    out.add(mod)
    return {m for m in out if m in mods and m != name}


def find_cycle(graph: dict):
    """One import circle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_no_import_circles():
    mods = package_modules()
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    assert "gptkernels.gpt.model" in graph  # the walk found the application
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a circle closed by a function-level import is found."""
    mods = {"gptkernels.a": "a.py", "gptkernels.b": "b.py", "gptkernels": "__init__.py"}
    (tmp_path / "a.py").write_text("from gptkernels import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    graph = {m: imports_of(m, str(tmp_path / p), mods) for m, p in mods.items() if m != "gptkernels"}
    assert find_cycle(graph) in (["gptkernels.a", "gptkernels.b", "gptkernels.a"],
                                 ["gptkernels.b", "gptkernels.a", "gptkernels.b"])
    (tmp_path / "b.py").write_text("def f():\n    import os\n")
    graph = {m: imports_of(m, str(tmp_path / p), mods) for m, p in mods.items() if m != "gptkernels"}
    assert find_cycle(graph) is None


def test_no_python_file_over_500_lines():
    long = {}
    for m, p in package_modules().items():
        with open(p, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[os.path.relpath(p, ROOT)] = n
    assert not long, f"files over {MAX_LINES} lines: {long}"
