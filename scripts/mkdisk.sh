#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds the ext4 disk image the virtio-blk tests give a Linux VM (a `<vm>:disk` module):
# mke2fs -d fills it from a staging folder, without root and without a loop mount.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/mkdisk.sh [--out FILE] [--size MIB]

Writes an ext4 image (default build/disk/test-ext4.img, 16 MiB) holding
  /hello.txt     one line: "vireo-disk hello"
  /payload.bin   64 KiB of deterministic bytes (sha256 printed below)
and prints
  image=FILE
  payload_sha256=HEX
The image is rebuilt only when missing or older than this script. It is reproducible
(fixed UUID, hash seed and timestamps), so two builds are byte-identical.
Needs mke2fs from e2fsprogs (scripts/install-deps.sh linux installs it).
EOF
}

OUT_FILE="$VIREO_ROOT/build/disk/test-ext4.img"
SIZE_MIB=16
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) need_arg "$1" "$#"; OUT_FILE="$(abspath "$2")"; shift 2 ;;
        --size) need_arg "$1" "$#"; SIZE_MIB="$2"; shift 2 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
[[ "$SIZE_MIB" =~ ^[0-9]+$ && "$SIZE_MIB" -ge 2 ]] || usage_error "--size wants a whole number of MiB, at least 2"

MKE2FS="$(command -v mke2fs || true)"
[[ -n "$MKE2FS" ]] || MKE2FS=/usr/sbin/mke2fs
[[ -x "$MKE2FS" ]] || die "mke2fs not found (install e2fsprogs: scripts/install-deps.sh linux)"

stage="$(mktemp -d "${TMPDIR:-/tmp}/vireo-disk.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
echo "vireo-disk hello" >"$stage/hello.txt"
# 64 KiB from a fixed seed: the guest checks the sha256 printed here.
python3 -c 'import hashlib,sys; sys.stdout.buffer.write(b"".join(hashlib.sha256(b"vireo%d" % i).digest() for i in range(2048)))' \
    >"$stage/payload.bin"
touch -h -d @0 "$stage"/*
payload_sha="$(sha256sum "$stage/payload.bin" | cut -d' ' -f1)"

if [[ ! -s "$OUT_FILE" || "$OUT_FILE" -ot "${BASH_SOURCE[0]}" ]]; then
    mkdir -p "$(dirname "$OUT_FILE")"
    rm -f "$OUT_FILE.tmp"
    E2FSPROGS_FAKE_TIME=1 "$MKE2FS" -q -F -t ext4 -b 1024 -L vireo-test \
        -U 6d1f2a4e-0b5c-4a4f-9a44-7669726f6469 -E hash_seed=6d1f2a4e-0b5c-4a4f-9a44-7669726f6469 \
        -d "$stage" "$OUT_FILE.tmp" "${SIZE_MIB}M" >/dev/null
    mv -f "$OUT_FILE.tmp" "$OUT_FILE"
    note "wrote $OUT_FILE (${SIZE_MIB} MiB)"
fi
echo "image=$OUT_FILE"
echo "payload_sha256=$payload_sha"
