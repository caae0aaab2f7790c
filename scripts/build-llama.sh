#!/usr/bin/env bash
# Build llama-server and ggml-rpc-server (with the RPC backend) from the llama.cpp
# tree vendored in the llama-cpp-python sdist, pinned below. Result:
#   $MESH_CACHE/llama.cpp/<version>/bin/{llama-server,ggml-rpc-server}
# A finished build is renamed into place at the end, so an interrupted build never
# looks complete.
source "$(dirname "$0")/lib.sh"

# shellcheck source=llama-cpp.pin
source "$(dirname "$0")/llama-cpp.pin"
SDIST_SHA256="$LLAMA_CPP_SDIST_SHA256"
dest="$MESH_CACHE/llama.cpp/$LLAMA_CPP_PYTHON_VERSION"

if [ -x "$dest/bin/llama-server" ] && [ -x "$dest/bin/ggml-rpc-server" ]; then
    echo "$dest/bin"
    exit 0
fi

need_cmd cmake "install cmake >= 3.14 (Debian: apt-get install cmake)"
need_cmd g++ "install a C++17 compiler (Debian: apt-get install g++)"
need_cmd python3 "install Python 3.11"
need_free_mib "$MESH_CACHE" 3000

work=$(mktemp -d "$MESH_CACHE/.llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
python3 -m pip download --quiet --no-binary :all: --no-deps \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" \
    || die "no network to PyPI: cannot download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
sdist="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
[ -f "$sdist" ] || die "pip did not produce $sdist"
got=$(sha256_of "$sdist")
[ "$got" = "$SDIST_SHA256" ] || die "sha256 mismatch for $(basename "$sdist"): got $got, want $SDIST_SHA256"

tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
[ -f "$src/tools/rpc/rpc-server.cpp" ] || die "sdist has no vendor/llama.cpp/tools/rpc: not the expected tree"

jobs=$(nproc)
log "configuring llama.cpp (GGML_RPC=ON, static, $jobs jobs)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF >"$work/configure.log" 2>&1 \
    || { tail -20 "$work/configure.log" >&2; die "cmake configure of llama.cpp failed (log above)"; }
log "building llama-server and ggml-rpc-server (about 6 minutes on 2 cores)"
cmake --build "$work/build" -j "$jobs" --target llama-server ggml-rpc-server >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; die "build of llama.cpp failed (log above)"; }

stage="$work/out"
mkdir -p "$stage/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/ggml-rpc-server" "$stage/bin/"
"$stage/bin/llama-server" --version >"$stage/VERSION" 2>&1 || die "built llama-server does not run"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
log "llama.cpp ready: $(head -1 "$dest/VERSION")"
echo "$dest/bin"
