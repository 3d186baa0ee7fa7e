"""The ROS 2 room: the only package of vla_node that imports rclpy.

    node.py             the vla node (parameters, QoS, callbacks, diagnostics, lifecycle)
    convert.py          ROS messages <-> the pydantic contract (vla_node.actions), images
    replay_session.py   vla-replay's rclpy side (context, in-process node, client node)

Everything it serves (pipeline, backends, parser, policy) is ROS-free and runs without it.
"""
