#!/usr/bin/env bash
# Build mesh's container images on this machine, under the chart's default names:
#   llama      ghcr.io/mesh-dev/llama.cpp:<LLAMA_CPP_PYTHON_VERSION>-cpu   (Dockerfile.llama)
#   mesh       ghcr.io/mesh-dev/mesh:<appVersion>                          (Dockerfile.operator)
#   agent      ghcr.io/mesh-dev/mesh-agent:<appVersion>                    (Dockerfile.agent)
#   llama-old  ghcr.io/mesh-dev/llama.cpp:<LLAMA_CPP_OLD_PYTHON_VERSION>-cpu, ggml-rpc-server
#              of an older RPC protocol, for the version mismatch test (--old)
# on the base made by build-base-image.sh, then prints their sizes. The engine's
# layer cache makes a rebuild with nothing changed take seconds. A tag is only
# ever set by a build that succeeded. Also installs actionlint (cached), which
# lints the release workflow.
#
#   build-images.sh [--old] [IMAGE...]     default IMAGEs: llama mesh agent
#   build-images.sh --sizes [IMAGE...]     build nothing; sizes of the built images,
#                                          uncompressed and gzip-compressed (`save | gzip`)
# Environment: MESH_ENGINE (podman or docker), MESH_IMAGE_REPO (default
# ghcr.io/mesh-dev), MESH_CA_BUNDLE (CA bundle lent to pip during builds).
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/build-base-image.sh"
source "$root/scripts/llama-cpp.pin"

ACTIONLINT_VERSION=v1.7.12
REPO="${MESH_IMAGE_REPO:-ghcr.io/mesh-dev}"
KNOWN="llama mesh agent llama-old"

images=()
with_old=""
sizes_only=""
for arg in "$@"; do
    case "$arg" in
        --old) with_old=1 ;;
        --sizes) sizes_only=1 ;;
        -*) die "unknown option $arg (usage: build-images.sh [--old] [--sizes] [IMAGE...], IMAGE: $KNOWN)" ;;
        *)
            [[ " $KNOWN " == *" $arg "* ]] || die "unknown image '$arg' (known: $KNOWN)"
            images+=("$arg")
            ;;
    esac
done
[ ${#images[@]} -gt 0 ] || images=(llama mesh agent)
[ -z "$with_old" ] || images+=(llama-old)

app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$root/charts/mesh/Chart.yaml")
[ -n "$app_version" ] || die "no appVersion in charts/mesh/Chart.yaml"
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)

tag_of() {
    case "$1" in
        llama) echo "$REPO/llama.cpp:$LLAMA_CPP_PYTHON_VERSION-cpu" ;;
        llama-old) echo "$REPO/llama.cpp:${LLAMA_CPP_OLD_PYTHON_VERSION:?no old pin}-cpu" ;;
        mesh) echo "$REPO/mesh:$app_version" ;;
        agent) echo "$REPO/mesh-agent:$app_version" ;;
    esac
}

# install_actionlint: the workflow linter, built once with `go install` into the
# cache and linked where the tests look for parts (.mesh/bin).
install_actionlint() {
    local dest="$MESH_CACHE/tools/actionlint-$ACTIONLINT_VERSION"
    if [ ! -x "$dest/actionlint" ]; then
        need_go 1.25
        log "installing actionlint $ACTIONLINT_VERSION (go install)"
        GOBIN="$dest.tmp" go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" \
            >"$MESH_CACHE/actionlint-install.log" 2>&1 \
            || { tail -5 "$MESH_CACHE/actionlint-install.log" >&2
                 die "go install of actionlint $ACTIONLINT_VERSION failed: no network to the Go module proxy?"; }
        rm -rf "$dest"
        mv "$dest.tmp" "$dest"
    fi
    mkdir -p "$root/.mesh/bin"
    ln -sfn "$dest/actionlint" "$root/.mesh/bin/actionlint"
}

# print_sizes: each image's size as the engine reports it, and gzip-compressed as
# a registry would roughly store it.
print_sizes() {
    local image tag size packed bytes
    printf '%-48s %12s %14s\n' IMAGE "SIZE (MB)" "GZIPPED (MB)"
    for image in "${images[@]}"; do
        tag=$(tag_of "$image")
        image_exists "$tag" || die "image $tag not built: run scripts/build-images.sh $image"
        size=$("$ENGINE" image inspect --format '{{.Size}}' "$tag")
        packed=-
        if [ -n "$sizes_only" ]; then
            bytes=$("$ENGINE" save "$tag" 2>/dev/null | gzip -c | wc -c) \
                || die "$ENGINE save $tag failed"
            packed=$((bytes / 1000000))
        fi
        printf '%-48s %12s %14s\n' "$tag" "$((size / 1000000))" "$packed"
    done
}

if [ -n "$sizes_only" ]; then
    engine_setup
    print_sizes
    exit 0
fi

engine_setup install
mkdir -p "$MESH_CACHE/images"
storage="$MESH_CACHE"
if [ "$(basename "$ENGINE")" = podman ]; then
    storage=$("$ENGINE" info --format '{{.Store.GraphRoot}}' 2>/dev/null) \
        || die "podman does not run: $("$ENGINE" info 2>&1 | tail -1)"
fi
# A llama.cpp build tree takes about 3 GiB while it compiles.
need_mib=1000
for image in "${images[@]}"; do
    case "$image" in llama*) image_exists "$(tag_of "$image")" || need_mib=4000 ;; esac
done
need_free_mib "$storage" "$need_mib"

install_actionlint
bash "$root/scripts/build-base-image.sh" >/dev/null

build_args=(--build-arg "REVISION=$revision")
case "$(basename "$ENGINE")" in
    # Never a registry: the base is local, made by build-base-image.sh.
    podman) build_args+=(--pull=never) ;;
esac
ca="${MESH_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -s "$ca" ] && build_args+=(--secret "id=cacert,src=$ca")

# build IMAGE: one image from its Dockerfile; the engine tags it only on success.
build() {
    local image="$1" tag dockerfile args=()
    tag=$(tag_of "$image")
    case "$image" in
        llama)
            dockerfile=Dockerfile.llama
            args=(--build-arg VARIANT=cpu --build-arg "VERSION=$LLAMA_CPP_PYTHON_VERSION")
            ;;
        llama-old)
            dockerfile=Dockerfile.llama
            args=(--build-arg VARIANT=cpu --build-arg PIN=old
                  --build-arg "VERSION=$LLAMA_CPP_OLD_PYTHON_VERSION")
            ;;
        mesh) dockerfile=Dockerfile.operator; args=(--build-arg "VERSION=$app_version") ;;
        agent) dockerfile=Dockerfile.agent; args=(--build-arg "VERSION=$app_version") ;;
    esac
    local logfile="$MESH_CACHE/images/$image.log" started=$SECONDS
    log "building $tag ($dockerfile)"
    "$ENGINE" build "${build_args[@]}" "${args[@]}" -f "$root/$dockerfile" -t "$tag" "$root" \
        >"$logfile" 2>&1 \
        || { tail -15 "$logfile" >&2; die "build of $tag failed (log: $logfile)"; }
    log "built $tag in $((SECONDS - started)) s"
}

for image in "${images[@]}"; do
    build "$image"
done

print_sizes
