#!/usr/bin/env bash
# Fetch Prometheus from Debian's packages without installing it system-wide:
# `apt-get download` the pinned .deb and unpack only the server binary and promtool.
# Result: $MESH_CACHE/prometheus/<version>/bin/{prometheus,promtool}
source "$(dirname "$0")/lib.sh"

PROM_DEB_VERSION="2.42.0+ds-5+deb12u1"
dest="$MESH_CACHE/prometheus/$PROM_DEB_VERSION"

if [ -x "$dest/bin/prometheus" ] && [ -x "$dest/bin/promtool" ]; then
    echo "$dest/bin"
    exit 0
fi

need_cmd apt-get "Prometheus comes from Debian's packages: run on Debian 12 or install prometheus $PROM_DEB_VERSION"
need_cmd dpkg-deb "install dpkg"
need_free_mib "$MESH_CACHE" 500
work=$(mktemp -d "$MESH_CACHE/.prometheus.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading Debian package prometheus=$PROM_DEB_VERSION"
if ! (cd "$work" && apt-get download -q "prometheus=$PROM_DEB_VERSION" >"$work/apt.log" 2>&1); then
    # The package lists may be missing on a fresh machine: refresh them once.
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q >>"$work/apt.log" 2>&1 || die "no network to Debian's package mirror (apt-get update failed)"
        (cd "$work" && apt-get download -q "prometheus=$PROM_DEB_VERSION" >>"$work/apt.log" 2>&1) \
            || die "apt-get download prometheus=$PROM_DEB_VERSION failed: $(tail -1 "$work/apt.log")"
    else
        die "apt-get download prometheus=$PROM_DEB_VERSION failed: $(tail -1 "$work/apt.log")"
    fi
fi
deb=$(ls "$work"/prometheus_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || die "apt-get download produced no prometheus .deb"
dpkg-deb -x "$deb" "$work/root" || die "cannot unpack $(basename "$deb")"

stage="$work/out"
mkdir -p "$stage/bin"
# The package's two programs, wherever it unpacks them.
for program in prometheus promtool; do
    found=$(find "$work/root" -type f -path "*/bin/$program" -perm -u+x | head -1)
    [ -n "$found" ] || die "$(basename "$deb") has no $program program"
    cp "$found" "$stage/bin/" || die "cannot copy $program out of $(basename "$deb")"
done
"$stage/bin/prometheus" --version >"$stage/VERSION" 2>&1 || die "unpacked prometheus does not run"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
log "prometheus ready: $(head -1 "$dest/VERSION")"
echo "$dest/bin"
