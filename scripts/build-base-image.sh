#!/usr/bin/env bash
# The base of every mesh image, made here from Debian's packages rather than pulled:
# mmdebstrap's minbase of bookworm (with its updates and security fixes; docs, man
# pages and locales left out as in Docker's debian:bookworm-slim), imported under
# the name the Dockerfiles' `FROM debian:bookworm-slim` resolves to. Skipped when
# an image of that name exists.
#
#   build-base-image.sh            make the base unless it exists; prints its name
#   build-base-image.sh --engine   print the container engine and its CONTAINERS_CONF
#                                  (one per line; nothing built or installed)
#
# Also sourced by build-images.sh for the engine helpers below.
# Environment: MESH_ENGINE (podman or docker; default: podman when installed),
# MESH_DEBIAN_MIRROR, MESH_DEBIAN_SECURITY_MIRROR.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE_IMAGE="docker.io/library/debian:bookworm-slim"
DEBIAN_MIRROR="${MESH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${MESH_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
ENGINE=""
ENGINE_CONF=""

# apt_install CMD PACKAGE: make CMD available, installing PACKAGE (as root) if needed.
apt_install() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die "$1 not found on PATH: install it (Debian: apt-get install $2)"
    fi
    log "installing $2 from Debian's packages"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 \
            || die "apt-get install $2 failed: no network to Debian's mirror?"
    fi
    command -v "$1" >/dev/null 2>&1 || die "$1 still not on PATH after apt-get install $2"
}

# engine_setup [install]: choose the engine (podman preferred) into ENGINE. With
# `install`, a machine without either gets podman from Debian's packages.
# podman gets a containers.conf in the cache, never in /etc: runc, because crun
# refuses hybrid cgroups, and default ulimits inside the machine's hard limits.
engine_setup() {
    if [ -n "${MESH_ENGINE:-}" ]; then
        command -v "$MESH_ENGINE" >/dev/null 2>&1 \
            || die "container engine $MESH_ENGINE (MESH_ENGINE) not found on PATH"
        ENGINE="$MESH_ENGINE"
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        # A docker client is used only with a daemon that answers: a machine may
        # have the client alone.
        ENGINE=docker
    elif [ "${1:-}" = install ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt_install podman podman
        ENGINE=podman
    else
        die "no container engine: install podman (Debian: apt-get install podman runc) or run a docker daemon"
    fi
    case "$(basename "$ENGINE")" in
        podman)
            [ "${1:-}" = install ] && apt_install runc runc
            ENGINE_CONF="$MESH_CACHE/containers/containers.conf"
            mkdir -p "$(dirname "$ENGINE_CONF")"
            printf '%s\n' \
                '# Written by scripts/build-base-image.sh; podman reads it through CONTAINERS_CONF.' \
                '[engine]' 'runtime = "runc"' '[containers]' \
                'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]' \
                >"$ENGINE_CONF.tmp"
            mv "$ENGINE_CONF.tmp" "$ENGINE_CONF"
            export CONTAINERS_CONF="$ENGINE_CONF"
            ;;
        docker) ;;
        *) die "unknown container engine $ENGINE: podman or docker" ;;
    esac
}

image_exists() {
    "$ENGINE" image inspect "$1" >/dev/null 2>&1
}

build_base() {
    if image_exists "$BASE_IMAGE"; then
        echo "$BASE_IMAGE"
        return 0
    fi
    need_cmd curl "install curl (Debian: apt-get install curl)"
    check_registry "$DEBIAN_MIRROR/dists/bookworm/Release" "Debian's mirror"
    apt_install mmdebstrap mmdebstrap
    need_free_mib "$MESH_CACHE" 1000
    local work
    work=$(mktemp -d "$MESH_CACHE/.base-image.XXXXXX")
    # shellcheck disable=SC2064  # expand now: work is local
    trap "rm -rf '$work'" EXIT
    log "making $BASE_IMAGE from Debian's packages (mmdebstrap, minbase)"
    # As in Docker's Debian images: apt-get install in a Dockerfile keeps no .deb
    # files nor package caches in its layer.
    export MESH_APT_CLEAN="$work/docker-clean"
    printf '%s\n' \
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' \
        'Acquire::Languages "none";' >"$MESH_APT_CLEAN"
    # The path-excludes stay in the image, so later apt-get installs leave docs out too.
    # The merged-usr hook installs usr-is-merged, as Debian's own images do, instead
    # of usrmerge and the whole of perl it needs.
    mmdebstrap --variant=minbase --format=tar \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/groff/*' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --customize-hook='cp "$MESH_APT_CLEAN" "$1/etc/apt/apt.conf.d/docker-clean"' \
        --customize-hook='rm -f "$1"/var/cache/apt/*.bin' \
        bookworm "$work/rootfs.tar" \
        "deb $DEBIAN_MIRROR bookworm main" \
        "deb $DEBIAN_MIRROR bookworm-updates main" \
        "deb $DEBIAN_SECURITY_MIRROR bookworm-security main" \
        >"$work/mmdebstrap.log" 2>&1 \
        || { tail -20 "$work/mmdebstrap.log" >&2; die "mmdebstrap of bookworm failed (log above)"; }
    # Tagged only once the whole tree is in: a failed run leaves no base behind.
    "$ENGINE" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        "$work/rootfs.tar" "$BASE_IMAGE" >"$work/import.log" 2>&1 \
        || { tail -5 "$work/import.log" >&2; die "$ENGINE import of the bookworm tree failed"; }
    log "base image ready: $BASE_IMAGE"
    echo "$BASE_IMAGE"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
        --engine)
            engine_setup
            echo "$ENGINE"
            echo "$ENGINE_CONF"
            ;;
        "")
            engine_setup install
            build_base
            ;;
        *) die "unknown argument $1 (usage: build-base-image.sh [--engine])" ;;
    esac
fi
