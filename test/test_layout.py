"""The package's layout rules: no import cycles between hnseg_infer's modules (top-level imports; a function's late
import is a deliberate, lazy one), and the tools (phantoms, metrics, QC) off the inference path."""

import ast

from conftest import REPO

PACKAGE = REPO / "hnseg_infer"


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hnseg_infer"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names
                         if (REPO / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()}
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if cycle := visit(dep):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the graph is read: a check over nothing would pass too
    assert find_cycle(graph) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # and the search finds one


def test_tools_are_off_the_inference_path():
    graph = import_graph()
    inference = [m for m in graph if not m.startswith(("hnseg_infer.tools", "hnseg_infer.cli"))]
    assert not [(m, d) for m in inference for d in graph[m] if d.startswith("hnseg_infer.tools")]
