"""Helpers for tests that run real rclpy graphs (imported only by ROS tests)."""
from __future__ import annotations

import time
from typing import Callable

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (run `make setup`)")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402


def spin_until(executor: SingleThreadedExecutor, condition: Callable[[], bool], timeout_s: float) -> bool:
    """Spin until condition() is true or the timeout passes; returns condition()."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        executor.spin_once(timeout_sec=0.05)
    return condition()


def wait_for_subscribers(executor, publisher, count: int = 1, timeout_s: float = 10.0) -> None:
    assert spin_until(executor, lambda: publisher.get_subscription_count() >= count, timeout_s), (
        f"no subscriber matched {publisher.topic_name} within {timeout_s} s")


@pytest.fixture
def ros_context():
    """A fresh rclpy context per test, shut down afterwards."""
    context = rclpy.context.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)
