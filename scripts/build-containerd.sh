#!/usr/bin/env bash
# Build containerd 2 (the daemon, its runc shim and ctr) from the Go module proxy
# at a pinned version, for the real test nodes that mount image volumes: the
# kubelet's `image` volumes need containerd >= 2.1, and Debian 12 ships 1.6.
# Nodes keep Debian's containerd unless a node set asks for this one
# (e2e/nodes: `RealNodes(..., containerd=2)`).
#
# Result: $MESH_CACHE/containerd/<version>-<recipe hash>/bin/{containerd,
# containerd-shim-runc-v2,ctr}, printed on stdout. Built into a temporary folder
# and renamed into place when every program is there and runs.
source "$(dirname "$0")/lib.sh"

CONTAINERD_VERSION="v2.4.2"
GO_MIN="1.26.6"   # the `go` line of containerd v2.4.2's go.mod
programs=(containerd containerd-shim-runc-v2 ctr)

recipe_hash=$(sha256sum "$0" | cut -c1-12)
dest="$MESH_CACHE/containerd/$CONTAINERD_VERSION-$recipe_hash"

complete=1
for p in "${programs[@]}"; do [ -x "$dest/bin/$p" ] || complete=0; done
if [ "$complete" = 1 ]; then
    echo "$dest/bin"
    exit 0
fi

need_go "$GO_MIN"
need_free_mib "$MESH_CACHE" 1000
need_free_mib "$(go env GOMODCACHE)" 1500
module="github.com/containerd/containerd/v2"
check_registry "$(go env GOPROXY | cut -d, -f1)/$module/@v/$CONTAINERD_VERSION.info" "the Go module proxy"

stage=$(mktemp -d "$MESH_CACHE/.containerd-build.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"
start=$(date +%s)
# Static, as upstream's static release: no cgo (so no btrfs snapshotter, which
# the nodes do not use), pure-Go user and DNS lookups.
export CGO_ENABLED=0 GOFLAGS="-trimpath"
tags="urfave_cli_no_docs osusergo netgo static_build no_btrfs no_zfs no_devmapper"
ldflags="-s -w -X $module/version.Version=$CONTAINERD_VERSION -X $module/version.Package=$module"
for p in "${programs[@]}"; do
    extra_tags=""
    # The shim serves ttrpc only (upstream's SHIM_GO_BUILDTAGS).
    [ "$p" = containerd-shim-runc-v2 ] && extra_tags=" no_grpc"
    log "building $p $CONTAINERD_VERSION"
    GOBIN="$stage/bin" go install -tags "$tags$extra_tags" -ldflags "$ldflags" \
        "$module/cmd/$p@$CONTAINERD_VERSION" || die "go install of $p $CONTAINERD_VERSION failed"
done

"$stage/bin/containerd" --version | grep -q "$CONTAINERD_VERSION" \
    || die "built containerd does not report $CONTAINERD_VERSION"
"$stage/bin/containerd-shim-runc-v2" -v >/dev/null || die "built containerd-shim-runc-v2 does not run"
echo "$(($(date +%s) - start))" >"$stage/BUILD_SECONDS"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
log "containerd $CONTAINERD_VERSION ready in $(cat "$dest/BUILD_SECONDS") s: $dest/bin"
echo "$dest/bin"
