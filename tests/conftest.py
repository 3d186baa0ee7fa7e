"""Shared test set-up: offline model loading, isolated ROS traffic, and shared fixtures."""
import os
import random

# Nothing may be fetched from a model hub; every model is made by the project.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ROS traffic of this run stays on this machine and in its own domain.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(10, 99)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures_models import *  # noqa: E402,F401,F403  (tiny checkpoints and adapters)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="long fuzz run: 100,000 cases in tests/test_fuzz.py (same as VLA_FUZZ_LONG=1)")


def pytest_configure(config):
    # test_fuzz.py reads this at import, which comes after pytest_configure.
    if config.getoption("--long"):
        os.environ["VLA_FUZZ_LONG"] = "1"
