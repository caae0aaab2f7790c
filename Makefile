# The two commands of the README: `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup images demo test lint unit integration e2e cluster-up cluster-down nodes-up nodes-down bench clean

setup:
	bash scripts/setup.sh

# The images under the chart's default names, and the older RPC server the
# protocol mismatch test needs (docs/images.md).
images:
	bash scripts/build-images.sh --old

demo: setup images
	$(PY) -m e2e.demo

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: setup images lint
	CI=$${CI:-true} $(PY) -m pytest

unit:
	$(PY) -m pytest -m unit

integration:
	$(PY) -m pytest -m integration

e2e:
	$(PY) -m pytest -m e2e

cluster-up:
	$(PY) -m e2e.cluster up

cluster-down:
	$(PY) -m e2e.cluster down

# Three real nodes (kubelet, containerd, CNI, kube-proxy, kube-router, CoreDNS) on
# the local control plane, with the chart's default images in their registry.
nodes-up:
	$(PY) -m e2e.nodes up --nodes 3

nodes-down:
	$(PY) -m e2e.nodes down

bench:
	$(PY) -m bench

clean:
	-$(PY) -m e2e.nodes down
	-$(PY) -m e2e.cluster down
	rm -rf .mesh
