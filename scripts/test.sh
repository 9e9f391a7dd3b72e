#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The test command: installs what is missing, then runs every test of the workspace: the host
# unit tests and the end-to-end tests (the tests/ crate), which boot Vireo in QEMU and Bochs
# through the other scripts here.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/test.sh [CARGO TEST ARGS...]

Runs scripts/install-deps.sh (everything), then
  cargo test --workspace [CARGO TEST ARGS...]
from the repository root, and prints a summary of all the test binaries' results.
Example: scripts/test.sh -- --test-threads=1
EOF
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac

T0="$(now)"
"$VIREO_ROOT/scripts/install-deps.sh" all

OUTPUT="$(mktemp "${TMPDIR:-/tmp}/vireo-test.XXXXXX")"
trap 'rm -f "$OUTPUT"' EXIT

set +e
cargo test --workspace "$@" 2>&1 | tee "$OUTPUT"
rc="${PIPESTATUS[0]}"
set -e

echo
echo "===== summary ====="
grep -E '^[[:space:]]*(Running|Doc-tests) |^test result:' "$OUTPUT" | sed 's/^[[:space:]]*//' || true
if [[ "$rc" == 0 ]]; then
    echo "test.sh: cargo test passed in $(elapsed "$T0") s"
else
    echo "test.sh: FAILED (cargo test exit status $rc) after $(elapsed "$T0") s"
fi
# Last: the totals over all test binaries, as one plain line.
awk '/^test result:/ {
        for (i = 1; i < NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) g += $i
        }
     }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, g }' "$OUTPUT"
exit "$rc"
