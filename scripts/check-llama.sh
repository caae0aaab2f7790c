#!/usr/bin/env bash
# Check that a llama.cpp build serves: llama-server loads MODEL on 127.0.0.1 and
# answers one completion. `--version` alone runs no kernel; a build whose CPU
# kernels crash on this machine fails here, at setup, with its log, instead of in
# every test that starts a llama-server.
#
#   check-llama.sh BIN_DIR MODEL
source "$(dirname "$0")/lib.sh"

[ $# -eq 2 ] || die "usage: check-llama.sh BIN_DIR MODEL"
bin="$1"
model="$2"
[ -x "$bin/llama-server" ] || die "no llama-server in $bin"
[ -f "$model" ] || die "no model file $model"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
"$bin/llama-server" -m "$model" --host 127.0.0.1 --port "$port" -c 256 -np 1 -t 1 \
    </dev/null >"$work/llama-server.log" 2>&1 &
pid=$!
# Stopped by its pid whatever happens next.
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT

failed() {
    tail -15 "$work/llama-server.log" >&2
    die "llama-server of $bin $1 (its log above); rebuild with: rm -rf $(dirname "$bin") && make setup"
}

for _ in $(seq 1 240); do
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" && status=0 || status=$?
        failed "exited with status $status while loading $(basename "$model")"
    fi
    if python3 - "$port" <<'EOF' 2>/dev/null; then break; fi
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
    sys.exit(r.status != 200)
EOF
    sleep 0.5
done
answer=$(python3 - "$port" <<'EOF'
import json, sys, urllib.request
body = json.dumps({"prompt": "The capital of France is", "n_predict": 2}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/completion", body,
                                 {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as r:
    print(json.loads(r.read())["tokens_predicted"])
EOF
) || failed "did not answer a completion"
[ "$answer" -ge 1 ] 2>/dev/null || failed "answered a completion with no token ($answer)"
log "llama-server answers a completion ($(basename "$model"), $answer tokens)"
