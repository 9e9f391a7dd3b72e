#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds Vireo's multiboot2 ELF and prints its path on the last line of stdout (cargo's own
# output goes to stderr).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/build.sh [--features LIST] [--target-dir DIR] [--no-deps] [-- CARGO ARGS...]

Runs
  cargo build --release -p hypervisor --bin vireo --target x86_64-unknown-none [...]
from the repository root and prints the path of the ELF on the last line of stdout
(target/x86_64-unknown-none/release/vireo by default).

Options:
  --features LIST   cargo features, e.g. test-hooks
  --target-dir DIR  cargo's target directory (relative to the current directory); keep
                    test-hooks builds apart, e.g. --target-dir target/test-hooks
  --no-deps         do not check for (and install) the pinned Rust toolchain first
  -h, --help        this text
  -- ARGS...        more arguments for cargo build
EOF
}

FEATURES=""
TARGET_DIR=""
DEPS=1
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --features) need_arg "$1" "$#"; FEATURES="$2"; shift ;;
        --target-dir) need_arg "$1" "$#"; TARGET_DIR="$(abspath "$2")"; shift ;;
        --no-deps) DEPS=0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done

if [[ "$DEPS" == 1 ]]; then
    "$VIREO_ROOT/scripts/install-deps.sh" --quiet rust >&2
fi

args=(build --release -p hypervisor --bin vireo --target x86_64-unknown-none
      --message-format=json-render-diagnostics)
[[ -z "$FEATURES" ]] || args+=(--features "$FEATURES")
[[ -z "$TARGET_DIR" ]] || args+=(--target-dir "$TARGET_DIR")
args+=(${EXTRA[@]+"${EXTRA[@]}"})

messages="$(mktemp "${TMPDIR:-/tmp}/vireo-build.XXXXXX")"
trap 'rm -f "$messages"' EXIT
# Diagnostics are rendered to stderr; stdout carries cargo's JSON messages, which name the
# executable wherever a .cargo/config.toml or CARGO_TARGET_DIR put it.
if ! cargo "${args[@]}" >"$messages"; then
    die "cargo build failed"
fi

elf="$(grep -o '"executable":"[^"]*/vireo"' "$messages" | tail -n 1 | sed 's/^"executable":"//; s/"$//' || true)"
if [[ -z "$elf" ]]; then
    dir="${TARGET_DIR:-${CARGO_TARGET_DIR:-$VIREO_ROOT/target}}"
    [[ "$dir" == /* ]] || dir="$VIREO_ROOT/$dir"
    elf="$dir/x86_64-unknown-none/release/vireo"
fi
[[ -f "$elf" ]] || die "cargo build succeeded but there is no ELF at $elf"
printf '%s\n' "$elf"
