# Shared shell helpers for the scripts in this folder: cache location, one-line
# failures and atomic installs. Sourced, never run.
set -euo pipefail

MESH_CACHE="${MESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mesh}"
export MESH_CACHE
MESH_BIN="$MESH_CACHE/bin"

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}

# need_free_mib DIR MIB: fail early instead of dying half-way through a build.
need_free_mib() {
    mkdir -p "$1"
    local avail
    avail=$(df -Pm "$1" | awk 'NR==2 {print $4}')
    [ "$avail" -ge "$2" ] || die "disk full: $1 has ${avail} MiB free, needs ${2} MiB"
}

# need_go MAJOR.MINOR: the Go toolchain must be at least this version.
need_go() {
    need_cmd go "install Go >= $1 (https://go.dev/dl)"
    local have
    have=$(go env GOVERSION | sed 's/^go//')
    if ! printf '%s\n%s\n' "$1" "$have" | sort -V -C; then
        die "Go too old: have $have, need >= $1"
    fi
}

# check_registry URL NAME: one clear line when a package registry is unreachable.
check_registry() {
    curl -fsS --max-time 20 -o /dev/null "$1" 2>/dev/null \
        || die "no network to $2 ($1): cannot fetch what is not cached yet"
}

sha256_of() {
    sha256sum "$1" | awk '{print $1}'
}
