"""Deprecated name of vla_node.ros.node (the node moved into the ROS package, vla_node/ros/).

Kept so that `python -m vla_node.node` and `from vla_node.node import VlaNode` go on working;
both say where the node lives now. `ros2 run vla_node vla_node` and the `vla_node` command are
unchanged.
"""
import sys
import warnings

from vla_node.ros.node import PARAMETERS, VlaNode, VlaRuntime, main  # noqa: F401  (the old names)

MOVED = "vla_node.node is deprecated: the node is vla_node.ros.node (`python -m vla_node.ros.node`)"

if __name__ == "__main__":
    print(f"vla_node: {MOVED}", file=sys.stderr)
    sys.exit(main())
warnings.warn(MOVED, DeprecationWarning, stacklevel=2)
