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

Runs scripts/install-deps.sh (everything), then the lints
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets -- -D warnings          (host build, tests included)
  cargo clippy -p hypervisor -p vireo-selftest -p vireo-mbtest --target x86_64-unknown-none -- -D warnings
and
  cargo test --workspace --no-fail-fast [CARGO TEST ARGS...]
from the repository root, and prints a summary of all the test binaries' results. A lint
failure fails the run (the tests still run, so one report shows everything).
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

# Lints: formatting, then clippy on the host build and on the bare-metal builds.
lint_failed=()
run_lint() {
    local name="$1"
    shift
    echo "test.sh: lint $name: $*"
    if ! "$@"; then
        lint_failed+=("$name")
    fi
}
set +e
run_lint fmt cargo fmt --all -- --check
run_lint clippy-host cargo clippy --workspace --all-targets -q -- -D warnings
run_lint clippy-bare-metal cargo clippy -p hypervisor -p vireo-selftest -p vireo-mbtest --target x86_64-unknown-none -q -- -D warnings
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$OUTPUT"
rc="${PIPESTATUS[0]}"
set -e
if [[ ${#lint_failed[@]} -gt 0 && "$rc" == 0 ]]; then
    rc=1
fi

echo
echo "===== summary ====="
grep -E '^[[:space:]]*(Running|Doc-tests) |^test result:' "$OUTPUT" | sed 's/^[[:space:]]*//' || true
if [[ ${#lint_failed[@]} -gt 0 ]]; then
    echo "lints: FAILED: ${lint_failed[*]}"
else
    echo "lints: fmt, clippy (host and bare metal) clean"
fi
if [[ "$rc" == 0 ]]; then
    echo "test.sh: cargo test passed in $(elapsed "$T0") s"
else
    echo "test.sh: FAILED (exit status $rc) after $(elapsed "$T0") s"
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
