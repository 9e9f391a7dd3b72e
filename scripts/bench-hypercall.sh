#!/usr/bin/env bash
# Hypercall round-trip cost as a guest sees it, in each emulator configuration.
#
# The self-test guest in bench mode makes N PING hypercalls. Host time per round trip is
# measured differentially: (wall time of a boot with N calls - wall time of a boot with 0
# calls) / N, each the minimum of REPEATS boots, so boot and build time cancel out. (Guest
# TSC figures are printed too, but Bochs's TSC counts emulated instructions, not time.)
#
# The floor is measured in the same run: with `floor=on` on the VM line the backend answers
# PING in its own entry loop (RIP advance, RAX = arg + 1, re-entry; Backend::run_floor), which
# is what a minimal hypervisor would cost on the same emulator. ratio = normal / floor in host
# time per call; tsc_ratio = the same from the guest's own TSC per call (minimum over the
# repeats): on QEMU TCG the guest TSC is host time, measured without the boot; on Bochs it
# counts emulated instructions, so tsc_ratio is the instruction-count ratio, immune to host
# load, while host time on a busy machine is noisy.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=300000
REPEATS=3
CONFIGS=(qemu-svm bochs-vmx bochs-svm)

usage() {
    cat <<EOF2
Usage: scripts/bench-hypercall.sh [--calls N] [--repeats R] [--config qemu-svm|bochs-vmx|bochs-svm]...

Prints, per configuration, microseconds of host time per hypercall round trip through
Vireo's normal exit path and through the floor mode (floor=on), and their ratio.
Defaults: --calls $N --repeats $REPEATS, all configurations.
EOF2
}

chosen=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --calls) need_arg "$1" "$#"; N="$2"; shift ;;
        --repeats) need_arg "$1" "$#"; REPEATS="$2"; shift ;;
        --config) need_arg "$1" "$#"; chosen+=("$2"); shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ ${#chosen[@]} -eq 0 ]] || CONFIGS=("${chosen[@]}")

"$VIREO_ROOT/scripts/install-deps.sh" --quiet all
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"

run_once() { # CONFIG CALLS [VM-LINE WORDS] -> prints "seconds tsc_per_call"
    local config="$1" calls="$2" extra="${3:-}" cmd log t0 t1 tpc
    case "$config" in
        qemu-svm) cmd=("$VIREO_ROOT/scripts/run-qemu.sh" --accel tcg) ;;
        bochs-vmx) cmd=("$VIREO_ROOT/scripts/run-bochs.sh" --cpu vmx) ;;
        bochs-svm) cmd=("$VIREO_ROOT/scripts/run-bochs.sh" --cpu svm) ;;
        *) die "unknown configuration $config" ;;
    esac
    log="$(mktemp)"
    t0="$(date +%s.%N)"
    "${cmd[@]}" --headless --timeout 600 --elf "$ELF" --guest "selftest=bench bench=$calls${extra:+ $extra}" >"$log" 2>/dev/null ||
        { tail -20 "$log" >&2; die "$config run failed"; }
    t1="$(date +%s.%N)"
    tpc="$(sed -n 's/.*tsc_per_call=\([0-9]*\).*/\1/p' "$log" | head -n 1)"
    rm -f "$log"
    echo "$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.3f", a - b }') ${tpc:-0}"
}

min_of() { sort -g | head -n 1; }
per_call() { awk -v l="$1" -v b="$2" -v n="$N" 'BEGIN { printf "%.2f", (l - b) * 1000000 / n }'; }

printf '%-10s %8s %8s %9s %9s %10s %10s %7s %11s %11s %9s\n' \
    config calls base_s normal_s floor_s normal_us floor_us ratio normal_tsc floor_tsc tsc_ratio
for config in "${CONFIGS[@]}"; do
    base=() normal=() floor=() tsc=() ftsc=()
    for _ in $(seq "$REPEATS"); do
        read -r s _ < <(run_once "$config" 0)
        base+=("$s")
        read -r s t < <(run_once "$config" "$N")
        normal+=("$s")
        tsc+=("$t")
        read -r s t < <(run_once "$config" "$N" floor=on)
        floor+=("$s")
        ftsc+=("$t")
    done
    b="$(printf '%s\n' "${base[@]}" | min_of)"
    l="$(printf '%s\n' "${normal[@]}" | min_of)"
    f="$(printf '%s\n' "${floor[@]}" | min_of)"
    us="$(per_call "$l" "$b")"
    fus="$(per_call "$f" "$b")"
    ratio="$(awk -v a="$us" -v b="$fus" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
    nt="$(printf '%s\n' "${tsc[@]}" | min_of)"
    ft="$(printf '%s\n' "${ftsc[@]}" | min_of)"
    tratio="$(awk -v a="$nt" -v b="$ft" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
    printf '%-10s %8d %8.2f %9.2f %9.2f %10.2f %10.2f %7s %11s %11s %9s\n' \
        "$config" "$N" "$b" "$l" "$f" "$us" "$fus" "$ratio" "$nt" "$ft" "$tratio"
done
