#!/usr/bin/env bash
# Install everything mesh needs on a fresh machine, idempotently:
#   - a virtualenv in .venv with mesh and its development tools
#   - llama.cpp (llama-server, ggml-rpc-server), the gemma-3-270m model,
#     the Kubernetes control plane + helm + kwok, Prometheus
#   - the parts of real test nodes: kubelet, kube-proxy, containerd, runc, CNI
#     plugins, CoreDNS, kube-router, a local image registry; containerd 2 for
#     nodes that mount image volumes
# Built parts are cached in $MESH_CACHE (default ~/.cache/mesh) and linked under
# .mesh/ in the work tree, where the tests and the demo look for them.
source "$(dirname "$0")/lib.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

need_cmd python3 "install Python >= 3.11"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python too old: $(python3 --version 2>&1), need >= 3.11"
mkdir -p "$MESH_CACHE"

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
log "installing mesh and its development tools into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[dev]' \
    || die "pip install -e .[dev] failed: no network to PyPI?"

llama_bin=$(bash scripts/build-llama.sh)
model=$(bash scripts/fetch-model.sh)
bash scripts/check-llama.sh "$llama_bin" "$model"
toolchain_bin=$(bash scripts/build-toolchain.sh)
prometheus_bin=$(bash scripts/fetch-prometheus.sh)
nodeparts_bin=$(bash scripts/build-node-parts.sh)
containerd2_bin=$(bash scripts/build-containerd.sh)

mkdir -p .mesh/bin .mesh/models
for f in "$llama_bin"/* "$toolchain_bin"/* "$prometheus_bin"/* "$nodeparts_bin"/*; do
    ln -sfn "$f" ".mesh/bin/$(basename "$f")"
done
ln -sfn "$model" ".mesh/models/$(basename "$model")"
# A folder of its own: Debian's containerd 1.6 keeps the names on PATH.
ln -sfn "$containerd2_bin" .mesh/containerd2
log "setup complete: parts linked under .mesh/"
