"""No import cycle inside curate/ (nor pipelines/), counting imports made inside functions too:
a cycle hidden behind a lazy import is still two modules that cannot be understood apart."""
import ast
import os

from tests.conftest import REPO


def module_imports(package: str) -> dict[str, set[str]]:
    root = os.path.join(REPO, package)
    mods = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
            mod = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            mods[mod] = path
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in mods and n != mod}
        # importing a.b.c runs a/__init__ and a/b/__init__ first, unless mod lives inside them
        for dep in list(deps):
            parts = dep.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and not mod.startswith(parent + ".") and parent != mod:
                    deps.add(parent)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_curate():
    graph = module_imports("curate")
    assert len(graph) > 20
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_curate_does_not_import_pipelines_or_beam_at_the_top():
    """The library is pure: Beam lives in pipelines/ (curate.cli imports the job lazily)."""
    for folder, _, names in os.walk(os.path.join(REPO, "curate")):
        for name in names:
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
                for node in tree.body:
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        mod = node.names[0].name if isinstance(node, ast.Import) else (node.module or "")
                        assert not mod.startswith(("apache_beam", "pipelines")), f"{name} imports {mod}"


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
