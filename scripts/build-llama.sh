#!/usr/bin/env bash
# Build llama-server and ggml-rpc-server (with the RPC backend) from the llama.cpp
# tree vendored in the llama-cpp-python sdist pinned in llama-cpp.pin. Result:
#   $MESH_CACHE/llama.cpp/<version>-r2/bin/{llama-server,ggml-rpc-server}
# The tests run this build; Dockerfile.llama runs this same script, so both build
# from one recipe. A finished build is renamed into place at the end, so an
# interrupted build never looks complete.
#
#   build-llama.sh                      the pinned build (what the tests use)
#   build-llama.sh --pin old            ggml-rpc-server only, from the older pin
#                                       (LLAMA_CPP_OLD_*: an older RPC protocol)
#   build-llama.sh --fetch-only DIR     download and check the sdist into DIR, build nothing
# Environment:
#   LLAMA_CMAKE_FLAGS     extra cmake flags (e.g. -DGGML_NATIVE=OFF, -DGGML_CUDA=ON);
#                         a build with them is cached apart from the plain one
#   LLAMA_SDIST_DIR       a directory holding the sdist already (checked all the same)
#   LLAMA_SKIP_RUN_CHECK  1: do not run the result (a CUDA build links the driver's
#                         stub, which does not run on a machine without the driver)
source "$(dirname "$0")/lib.sh"

pin=current
fetch_only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --pin) pin="${2:-}"; shift 2 ;;
        --fetch-only) fetch_only="${2:-}"; shift 2 ;;
        *) die "unknown argument $1 (usage: build-llama.sh [--pin current|old] [--fetch-only DIR])" ;;
    esac
done

# shellcheck source=llama-cpp.pin
source "$(dirname "$0")/llama-cpp.pin"
case "$pin" in
    current)
        version="$LLAMA_CPP_PYTHON_VERSION"
        want_sha="$LLAMA_CPP_SDIST_SHA256"
        programs=(llama-server ggml-rpc-server)
        ;;
    old)
        version="${LLAMA_CPP_OLD_PYTHON_VERSION:-}"
        want_sha="${LLAMA_CPP_OLD_SDIST_SHA256:-}"
        programs=(ggml-rpc-server)
        [ -n "$version" ] && [ -n "$want_sha" ] || die "llama-cpp.pin has no LLAMA_CPP_OLD_* pin"
        ;;
    *) die "unknown pin '$pin' (current or old)" ;;
esac
sdist_name="llama_cpp_python-$version.tar.gz"

# fetch_sdist DIR: the pinned sdist in DIR, downloaded unless already there, checked.
fetch_sdist() {
    mkdir -p "$1"
    if [ ! -f "$1/$sdist_name" ]; then
        need_cmd python3 "install Python 3.11"
        log "downloading llama-cpp-python==$version sdist"
        # The sdist of this package only: pip prepares its metadata with the build
        # backend, which comes as wheels instead of being built from source too.
        python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps \
            "llama-cpp-python==$version" -d "$1" \
            || die "no network to PyPI: cannot download llama-cpp-python==$version"
        [ -f "$1/$sdist_name" ] || die "pip did not produce $1/$sdist_name"
    fi
    local got
    got=$(sha256_of "$1/$sdist_name")
    [ "$got" = "$want_sha" ] || die "sha256 mismatch for $sdist_name: got $got, want $want_sha"
}

if [ -n "$fetch_only" ]; then
    fetch_sdist "$fetch_only"
    echo "$fetch_only/$sdist_name"
    exit 0
fi

# No AMX on x86-64: a native build on a CPU that reports AMX uses ggml's AMX
# matrix kernels for weights in RAM, and on virtual machines whose CPU reports
# AMX without the kernel granting its tile state, llama-server crashed (SIGSEGV in
# ggml_backend_amx_mul_mat) at its first decode. Explicit -mno-* flags win over
# -march=native whatever their order. The images (GGML_NATIVE=OFF) have no AMX
# either.
recipe_flags=()
if [ "$(uname -m)" = x86_64 ]; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    recipe_flags=("-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
fi

# Builds with other flags (a portable or CUDA image build) never reuse this
# machine's native build, nor the reverse; a build of an earlier recipe is not
# reused either.
suffix="-r2"
[ "$pin" = old ] && suffix="$suffix-rpc"
if [ -n "${LLAMA_CMAKE_FLAGS:-}" ]; then
    suffix="$suffix-$(printf '%s' "$LLAMA_CMAKE_FLAGS" | sha256sum | cut -c1-8)"
fi
dest="$MESH_CACHE/llama.cpp/$version$suffix"

built=1
for program in "${programs[@]}"; do
    [ -x "$dest/bin/$program" ] || built=0
done
if [ "$built" = 1 ]; then
    echo "$dest/bin"
    exit 0
fi

need_cmd cmake "install cmake >= 3.14 (Debian: apt-get install cmake)"
need_cmd g++ "install a C++17 compiler (Debian: apt-get install g++)"
need_free_mib "$MESH_CACHE" 3000

work=$(mktemp -d "$MESH_CACHE/.llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch_sdist "${LLAMA_SDIST_DIR:-$work}"
tar -xzf "${LLAMA_SDIST_DIR:-$work}/$sdist_name" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"

# The RPC server moved from examples/rpc to tools/rpc and its target was renamed
# from rpc-server to ggml-rpc-server; the result is ggml-rpc-server either way.
rpc_dir=""
for dir in tools/rpc examples/rpc; do
    [ -f "$src/$dir/rpc-server.cpp" ] && rpc_dir="$src/$dir" && break
done
[ -n "$rpc_dir" ] || die "sdist has no vendor/llama.cpp/{tools,examples}/rpc: not the expected tree"
rpc_target=$(sed -n 's/^set(TARGET \([a-z-]*\))$/\1/p' "$rpc_dir/CMakeLists.txt")
[ -n "$rpc_target" ] || die "cannot find the RPC server's target in $rpc_dir/CMakeLists.txt"
targets=("$rpc_target")
[ "$pin" = current ] && targets=(llama-server "$rpc_target")

jobs=$(nproc)
log "configuring llama.cpp $version (GGML_RPC=ON, static, $jobs jobs) ${LLAMA_CMAKE_FLAGS:-}"
# LLAMA_CMAKE_FLAGS is a list of flags: split on spaces on purpose.
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF "${recipe_flags[@]}" ${LLAMA_CMAKE_FLAGS:-} \
    >"$work/configure.log" 2>&1 \
    || { tail -20 "$work/configure.log" >&2; die "cmake configure of llama.cpp failed (log above)"; }
log "building ${targets[*]} (about 6 minutes on 2 cores)"
cmake --build "$work/build" -j "$jobs" --target "${targets[@]}" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; die "build of llama.cpp failed (log above)"; }

stage="$work/out"
mkdir -p "$stage/bin"
[ "$pin" = current ] && cp "$work/build/bin/llama-server" "$stage/bin/"
cp "$work/build/bin/$rpc_target" "$stage/bin/ggml-rpc-server"
if [ "${LLAMA_SKIP_RUN_CHECK:-0}" != 1 ]; then
    "$stage/bin/ggml-rpc-server" --help >/dev/null 2>&1 || die "built ggml-rpc-server does not run"
    if [ "$pin" = current ]; then
        "$stage/bin/llama-server" --version >"$stage/VERSION" 2>&1 \
            || die "built llama-server does not run"
    fi
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
log "llama.cpp $version ready: ${programs[*]} in $dest/bin"
echo "$dest/bin"
