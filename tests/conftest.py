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
