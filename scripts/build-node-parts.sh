#!/usr/bin/env bash
# Build or install what the real test nodes (e2e/nodes) run beside the control
# plane of scripts/build-toolchain.sh:
#   - kubelet and kube-proxy, from the same Kubernetes modules as the control plane;
#   - CoreDNS, the CNCF distribution registry, kube-router (its NetworkPolicy
#     controller) and crictl, from the Go module proxy at pinned versions;
#   - the sandbox ("pause") program, e2e/nodes/pause.c, built statically;
#   - containerd, runc, the CNI plugins, iptables, ipset, conntrack and nsenter,
#     from Debian's packages (installed system-wide: containerd finds its shim
#     and runc on PATH).
# Result: $MESH_CACHE/nodeparts/<versions>/bin/*. Built into a temporary folder and
# renamed into place when every part is there, so an interrupted build never
# looks complete.
source "$(dirname "$0")/lib.sh"

K8S_VERSION="v1.34.4"
COREDNS_VERSION="v1.15.0"
REGISTRY_VERSION="v3.1.2"
# kube-router is the policy enforcer that runs here: iptables + ipset (checked on
# this kernel). v2.1.0 is the version the Go module proxy serves; it is used only
# inside the test nodes' own network namespaces.
KUBE_ROUTER_VERSION="v2.1.0"
# crictl removes a node's pods through the CRI when the harness takes it down.
CRI_TOOLS_VERSION="v1.34.0"
GO_MIN="1.25"
DEBIAN_PACKAGES=(containerd runc containernetworking-plugins iptables ipset conntrack util-linux iproute2)

root="$(cd "$(dirname "$0")/.." && pwd)"
recipe_hash=$(cat "$0" "$root/e2e/nodes/pause.c" "$root/e2e/toolchain/go.mod" "$root/e2e/toolchain/go.sum" \
    | sha256sum | cut -c1-12)
dest="$MESH_CACHE/nodeparts/k8s-$K8S_VERSION-$recipe_hash"
tools=(kubelet kube-proxy coredns registry kube-router crictl pause)

install_debian_packages() {
    local missing=()
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    need_cmd apt-get "the node parts come from Debian's packages: run on Debian 12"
    [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root (apt-get install)"
    log "installing Debian packages: ${missing[*]}"
    local aptlog
    aptlog=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$aptlog" 2>&1; then
        apt-get update -q >>"$aptlog" 2>&1 || die "no network to Debian's package mirror (apt-get update failed)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$aptlog" 2>&1 \
            || die "apt-get install ${missing[*]} failed: $(tail -1 "$aptlog")"
    fi
    rm -f "$aptlog"
}

install_debian_packages
for program in containerd containerd-shim-runc-v2 runc iptables ipset conntrack nsenter ip; do
    need_cmd "$program" "it should come with the Debian packages ${DEBIAN_PACKAGES[*]}"
done
[ -x /usr/lib/cni/bridge ] || die "no CNI bridge plugin in /usr/lib/cni (package containernetworking-plugins)"

complete=1
for t in "${tools[@]}"; do [ -x "$dest/bin/$t" ] || complete=0; done
if [ "$complete" = 1 ]; then
    echo "$dest/bin"
    exit 0
fi

need_go "$GO_MIN"
need_cmd gcc "install gcc (Debian: apt-get install gcc)"
need_free_mib "$MESH_CACHE" 2000
need_free_mib "$(go env GOMODCACHE)" 2000
check_registry "$(go env GOPROXY | cut -d, -f1)/github.com/coredns/coredns/@v/$COREDNS_VERSION.info" \
    "the Go module proxy"

stage=$(mktemp -d "$MESH_CACHE/.nodeparts-build.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/module"
start=$(date +%s)
export CGO_ENABLED=0 GOFLAGS="-trimpath"

# kubelet and kube-proxy from the control plane's own module set: a copy of the
# wrapper module, so resolving their extra packages never rewrites the go.sum
# that keys the control plane's cache.
cp "$root/e2e/toolchain/go.mod" "$root/e2e/toolchain/go.sum" "$stage/module/"
printf 'package toolchain\n' >"$stage/module/doc.go"
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done
for cmd in kubelet kube-proxy; do
    log "building $cmd $K8S_VERSION"
    (cd "$stage/module" && GOFLAGS="$GOFLAGS -mod=mod" go build -ldflags "$k8s_ldflags" \
        -o "$stage/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd") || die "go build of $cmd $K8S_VERSION failed"
done

log "building coredns $COREDNS_VERSION"
GOBIN="$stage/bin" go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION" \
    || die "go install of coredns $COREDNS_VERSION failed"
log "building the distribution registry $REGISTRY_VERSION"
GOBIN="$stage/bin" go install -ldflags "-s -w" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" \
    || die "go install of registry $REGISTRY_VERSION failed"
log "building kube-router $KUBE_ROUTER_VERSION"
GOBIN="$stage/bin" go install -ldflags "-s -w" \
    "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION" \
    || die "go install of kube-router $KUBE_ROUTER_VERSION failed"

log "building crictl $CRI_TOOLS_VERSION"
GOBIN="$stage/bin" go install -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION" \
    || die "go install of crictl $CRI_TOOLS_VERSION failed"

log "building the pause program"
gcc -Os -static -Wall -Wextra -Werror -o "$stage/bin/pause" "$root/e2e/nodes/pause.c" \
    || die "gcc could not build e2e/nodes/pause.c statically (Debian: apt-get install libc6-dev)"

"$stage/bin/kubelet" --version | grep -q "$K8S_VERSION" || die "kubelet is not stamped $K8S_VERSION"
"$stage/bin/coredns" -version >/dev/null || die "built coredns does not run"
rm -rf "$stage/module"
echo "$(( $(date +%s) - start ))" >"$stage/BUILD_SECONDS"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
log "node parts ready in $(cat "$dest/BUILD_SECONDS") s: $dest/bin"
echo "$dest/bin"
