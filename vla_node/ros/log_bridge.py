"""Python logging, warnings and progress bars in a ROS process: through the node's ROS logger.

The node's own modules (vla_node.*) log at their level; libraries (transformers, peft, torch,
Python warnings such as FutureWarning) at debug, so the launch log shows ROS lines only and
`log_level:=debug` shows the rest. Progress bars (tqdm: transformers' "Loading weights") are off.
Installed by the node's executable (vla_node.ros.node.main), not by in-process users of the node.
"""
from __future__ import annotations

import logging
import os

OWN = "vla_node"


def quiet_progress_bars() -> None:
    """No tqdm bars: they are terminal animations, not log lines (set before the libraries run)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class RosLogHandler(logging.Handler):
    """A logging handler that writes each record through a ROS (rcutils) logger."""

    def __init__(self, ros_logger):
        super().__init__(logging.DEBUG)
        self.ros_logger = ros_logger
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).rstrip()
            if record.name == "py.warnings":  # "file:line: Category: message" + the source line: keep the first
                text = text.splitlines()[0]
            text = f"[{record.name}] {text}"
            logger = self.ros_logger
            # rclpy fixes a call site's severity on first use: one call site per level
            if not record.name.startswith(OWN) or record.levelno < logging.INFO:
                logger.debug(text)
            elif record.levelno >= logging.ERROR:
                logger.error(text)
            elif record.levelno >= logging.WARNING:
                logger.warning(text)
            else:
                logger.info(text)
        except Exception:  # logging must never raise into the code that logs
            self.handleError(record)


def route_python_logging(ros_logger, debug: bool) -> RosLogHandler:
    """Send every Python log record and warning to `ros_logger` instead of stderr. `debug`: the
    node logs at debug, so library records are worth producing (else only their warnings)."""
    handler = RosLogHandler(ros_logger)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger(OWN).setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> debug
    try:  # transformers keeps its own handler on its library root logger
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    return handler
