"""DESIGN.md's layers, checked on the source: who may import whom."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def importers_of(prefixes: tuple[str, ...], folder: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
                  if any(name == pre or name.startswith(pre + ".") for name in imported_modules(p) for pre in prefixes))


def test_only_the_node_module_imports_rclpy():
    # message types (ros_convert, bag_io) are data, not the ROS client library
    assert importers_of(("rclpy",), "vla_node") == ["vla_node/node.py"]


def test_training_never_imports_the_node():
    assert importers_of(("vla_node.node", "rclpy"), "training") == []


def test_core_modules_import_no_torch():
    core = [ROOT / "vla_node" / f"{name}.py" for name in ("actions", "prompt", "image", "parser", "policy", "text")]
    assert [str(p.name) for p in core if {"torch", "transformers"} & {n.split(".")[0] for n in imported_modules(p)}] == []
