"""The package's import graph has no cycle, and the layering the design promises holds.

Every `import` / `from ... import` statement in `twotower/` counts, including the ones inside
functions: a deferred import only hides a cycle from the interpreter, it does not remove it. An
edge goes from a module to the module it names (`from .x import y` is an edge to `x.y` when `y` is a
submodule, else to `x`). A package's `__init__` is the module of the package's own name, so
importing a package depends on what its `__init__` imports. The implicit import of a module's
parent packages is not counted: it is how Python finds a submodule, not a dependency of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "twotower"


def module_files(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """dotted name -> (file, is a package's __init__) for every module under `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imported(node: ast.ImportFrom, here: list[str]) -> str:
    """The absolute module name an ImportFrom names (relative levels resolved against `here`)."""
    if not node.level:
        return node.module or ""
    base = here[: len(here) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def edges(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                target = imported(node, here)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        graph[name].add(sub)
                    elif target in modules:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "twotower"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("def g():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    graph = edges(module_files(pkg))
    assert graph["twotower.a"] == {"twotower.sub.b"} and graph["twotower.sub.b"] == {"twotower.a"}
    assert cycles(graph) == [["twotower.a", "twotower.sub.b"]]


def test_the_package_has_no_import_cycle():
    found = cycles(edges(module_files()))
    assert not found, "import cycles (every import counts, deferred ones too):\n" + "\n".join(map(str, found))


def test_towers_never_import_the_model_or_the_decoders():
    """The towers are the bottom layer: `TwoTowerLM`, decoding, serving and training sit above them."""
    graph = edges(module_files())
    above = ("twotower.model", "twotower.decoding", "twotower.serving", "twotower.training", "twotower.cli")
    bad = {m: sorted(t for t in targets if t.startswith(above))
           for m, targets in graph.items() if m.startswith("twotower.towers")}
    assert not {m: t for m, t in bad.items() if t}


def tower_calls(tree: ast.AST) -> set[str]:
    """`receiver.method(...)` calls of a tower's decoding methods, where the receiver names a tower."""
    methods = {"prefill", "extend", "accept", "forward_block", "denoise_block", "draft_one_step"}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods:
            receiver = ast.unparse(node.func.value)
            if any(word in receiver for word in ("context", "denoiser", "tower")):
                found.add(f"{receiver}.{node.func.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in methods:
            found.add(node.func.id)
    return found


def test_tower_calls_are_seen():
    tree = ast.parse("towers.context.extend(c, x)\nself.tokens.extend(t)\ndenoise_block(d, c, 4)\n")
    assert tower_calls(tree) == {"towers.context.extend", "denoise_block"}


def test_serving_holds_no_decoding_loop():
    """`serving/` schedules requests; the decoders' own `prefill` / `advance` are the only loops."""
    for path in (PACKAGE / "serving").glob("*.py"):
        assert not tower_calls(ast.parse(path.read_text())), path.name
