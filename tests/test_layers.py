"""DESIGN.md's layers, checked on the source: who may import whom, and no import cycles.

Every import counts, also one inside a function (a late import is still a dependency).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vla_node", "training")
CORE = ("actions", "vocabulary", "parser", "prompt", "policy", "image", "text", "grammar", "settings", "pipeline")
# Tools above it all may use the ROS room (vla_node/node.py: the deprecated name of vla_node.ros.node).
ROS_USERS = {"vla_node.replay", "vla_node.demo", "vla_node.node"}


def imported_modules(path: Path, at_import: bool = False) -> set[str]:
    """Absolute module names `path` imports; `from a import b` gives a.b where that is a module.
    at_import: only what importing the module runs (not the imports inside functions)."""
    names = set()
    for node in _statements(ast.parse(path.read_text(encoding="utf-8"), str(path)), at_import):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # a submodule, else a name the module (or package face) defines
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if module_path(submodule) is not None else node.module)
    return names


def _statements(tree: ast.AST, at_import: bool):
    if not at_import:
        yield from ast.walk(tree)
        return
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(child for child in ast.iter_child_nodes(node)
                       if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def importers_of(prefixes: tuple[str, ...], package: str) -> list[str]:
    return sorted(name for name, path in project_modules().items()
                  if (name == package or name.startswith(package + "."))
                  and any(m == pre or m.startswith(pre + ".") for m in imported_modules(path) for pre in prefixes))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_only_the_ros_package_imports_rclpy():
    # message types (vla_node.ros.convert, bag_io) are data, not the ROS client library
    assert [name for name in importers_of(("rclpy",), "vla_node") if not name.startswith("vla_node.ros")] == []
    assert "vla_node.ros.node" in importers_of(("rclpy",), "vla_node")  # the check sees real imports


def test_only_tools_use_the_ros_package():
    users = {name for name in importers_of(("vla_node.ros",), "vla_node") if not name.startswith("vla_node.ros")}
    assert "vla_node.replay" in users and users <= ROS_USERS


def test_training_never_imports_ros():
    assert importers_of(("vla_node.ros", "vla_node.node", "rclpy"), "training") == []


def test_the_runtime_never_imports_training():
    assert importers_of(("training",), "vla_node") == []


def test_no_import_cycles():
    graph = imports_graph()
    assert graph["training.export"] and graph["vla_node.replay"]  # the graph holds real edges
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_modules_import_no_torch():
    heavy = {"torch", "transformers", "rclpy"}
    core = [ROOT / "vla_node" / f"{name}.py" for name in CORE]
    assert [p.name for p in core if heavy & {n.split(".")[0] for n in imported_modules(p, at_import=True)}] == []
    assert heavy & {n.split(".")[0] for n in imported_modules(ROOT / "vla_node" / "grammar.py")}  # only late
