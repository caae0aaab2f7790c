#!/usr/bin/env bash
# Build the local Kubernetes control plane from the official Go modules:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl
# (through the wrapper module in e2e/toolchain), plus helm and kwok.
# Result: $MESH_CACHE/toolchain/k8s-<version>/bin/*. Each binary is built into a
# temporary folder and the folder renamed into place once all are done, so an
# interrupted build never leaves a cache that looks complete.
source "$(dirname "$0")/lib.sh"

K8S_VERSION="v1.34.4"          # k8s.io/kubernetes, staging modules at v0.34.4
HELM_VERSION="v3.19.5"
KWOK_VERSION="v0.7.0"
GO_MIN="1.25"

root="$(cd "$(dirname "$0")/.." && pwd)"
modfile_hash=$(cat "$root/e2e/toolchain/go.mod" "$root/e2e/toolchain/go.sum" | sha256sum | cut -c1-12)
dest="$MESH_CACHE/toolchain/k8s-$K8S_VERSION-helm-$HELM_VERSION-kwok-$KWOK_VERSION-$modfile_hash"
tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm kwok)

complete=1
for t in "${tools[@]}"; do [ -x "$dest/bin/$t" ] || complete=0; done
if [ "$complete" = 1 ]; then
    echo "$dest/bin"
    exit 0
fi

need_go "$GO_MIN"
need_free_mib "$MESH_CACHE" 6000
need_free_mib "$(go env GOMODCACHE)" 3000
check_registry "$(go env GOPROXY | cut -d, -f1)/k8s.io/kubernetes/@v/$K8S_VERSION.info" "the Go module proxy"

stage=$(mktemp -d "$MESH_CACHE/.toolchain-build.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"
start=$(date +%s)

minor=$(echo "$K8S_VERSION" | cut -d. -f2)
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

export CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath"
cd "$root/e2e/toolchain"
log "downloading Kubernetes $K8S_VERSION modules"
go mod download || die "no network to the Go module proxy: cannot download k8s.io/kubernetes@$K8S_VERSION"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    log "building $cmd $K8S_VERSION"
    go build -ldflags "$k8s_ldflags" -o "$stage/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" \
        || die "go build of $cmd failed"
done
etcd_version=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
log "building etcd $etcd_version (the version Kubernetes $K8S_VERSION requires)"
go build -ldflags "-s -w" -o "$stage/bin/etcd" go.etcd.io/etcd/server/v3 || die "go build of etcd failed"
cd "$root"

log "building helm $HELM_VERSION"
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
done
GOBIN="$stage/bin" go install -ldflags "$helm_ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    || die "go install of helm $HELM_VERSION failed"

log "building kwok $KWOK_VERSION"
GOBIN="$stage/bin" go install -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" || die "go install of kwok $KWOK_VERSION failed"

"$stage/bin/kube-apiserver" --version | grep -q "$K8S_VERSION" || die "kube-apiserver is not stamped $K8S_VERSION"
"$stage/bin/etcd" --version >/dev/null || die "built etcd does not run"
echo "$(( $(date +%s) - start ))" >"$stage/BUILD_SECONDS"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
log "toolchain ready in $(cat "$dest/BUILD_SECONDS") s: $dest/bin"
echo "$dest/bin"
