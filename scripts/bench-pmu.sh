#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The cost of the virtual PMU on the world switch: the hypercall round trip (the self-test
# guest's `bench=N`, as in scripts/bench-hypercall.sh) in a VM without a PMU (pmu=off), with
# one it does not use (pmu=on) and with counters running (pmu=on bench_pmu=count: cycles, all
# exits and hypercall exits on three counters, so every exit and entry has counters to
# account), all measured in the same run, interleaved.
#
# Per mode: guest TSC per call (minimum over the repeats; on QEMU TCG the TSC is host time
# without the boot, on Bochs it counts emulated instructions, immune to host load) and host
# microseconds per call ((wall time of a boot with N calls - that of a boot with none) / N,
# minimum over the repeats). Ratios: on/off and count/off of both. The counting boot also
# checks its counters: exactly N hypercall exit events.
#
# With --linux, also a guest workload: the headless Debian guest (scripts/guest-linux.sh) times
# a shell loop counting to LOOP (`linux_guest_perf_run=LOOP`: perfprobe run, guests/linux/
# perfprobe.c) in a VM with pmu=off (nothing counted) and with pmu=on (perfprobe counting its
# cycles and exits, like `perf stat -e cycles,r0056`), one boot each per repeat, interleaved;
# prints the guest's elapsed time of the loop (minimum over the repeats) and the ratio.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=100000
REPEATS=3
CONFIGS=(qemu-svm)
LINUX=0
LOOP=20000

usage() {
    cat <<EOF2
Usage: scripts/bench-pmu.sh [--calls N] [--repeats R] [--config qemu-svm|bochs-vmx|bochs-svm]...
                            [--linux [--loop LOOP]]

Prints, per configuration, the hypercall round trip with the virtual PMU off, on but unused,
and on and counting (guest TSC per call and host microseconds per call), and the ratios to
off. Defaults: --calls $N --repeats $REPEATS --config qemu-svm.
--linux adds a Linux guest's shell loop counting to LOOP (default $LOOP), with pmu=off and with
perf counting it (a Linux boot per mode and repeat: ~20 s each on QEMU, ~2.5 min on Bochs).
Environment: VIREO_EMU_LOCK=FILE runs each boot under flock FILE.
EOF2
}

chosen=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --calls) need_arg "$1" "$#"; N="$2"; shift ;;
        --repeats) need_arg "$1" "$#"; REPEATS="$2"; shift ;;
        --config) need_arg "$1" "$#"; chosen+=("$2"); shift ;;
        --linux) LINUX=1 ;;
        --loop) need_arg "$1" "$#"; LOOP="$2"; shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ ${#chosen[@]} -eq 0 ]] || CONFIGS=("${chosen[@]}")
[[ "$N" =~ ^[1-9][0-9]*$ ]] || usage_error "--calls wants a positive number"
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || usage_error "--repeats wants a positive number"
[[ "$LOOP" =~ ^[1-9][0-9]*$ ]] || usage_error "--loop wants a positive number"

"$VIREO_ROOT/scripts/install-deps.sh" --quiet all
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"

# The VM-line words of each mode.
declare -A MODE_WORDS=([off]="pmu=off" [on]="pmu=on" [count]="pmu=on bench_pmu=count")
MODES=(off on count)

# emulator CONFIG: sets cmd to the run script and its options for CONFIG.
emulator() {
    case "$1" in
        qemu-svm) cmd=("$VIREO_ROOT/scripts/run-qemu.sh" --accel tcg) ;;
        bochs-vmx) cmd=("$VIREO_ROOT/scripts/run-bochs.sh" --cpu vmx) ;;
        bochs-svm) cmd=("$VIREO_ROOT/scripts/run-bochs.sh" --cpu svm) ;;
        *) die "unknown configuration $1" ;;
    esac
}

# run_once CONFIG CALLS WORDS: one boot; prints "seconds tsc_per_call bench_pmu-line".
run_once() {
    local config="$1" calls="$2" words="$3" cmd log t0 t1 tpc pmu
    emulator "$config"
    log="$(mktemp)"
    emu_lock
    t0="$(date +%s.%N)"
    "${cmd[@]}" --headless --timeout 600 --elf "$ELF" --guest "selftest=bench bench=$calls $words" >"$log" 2>/dev/null ||
        { emu_unlock; tail -20 "$log" >&2; die "$config run failed ($words)"; }
    t1="$(date +%s.%N)"
    emu_unlock
    tpc="$(sed -n 's/.*tsc_per_call=\([0-9]*\).*/\1/p' "$log" | head -n 1)"
    pmu="$(sed -n 's/.*selftest: bench_pmu \(.*\)$/\1/p' "$log" | tr -d '\r' | head -n 1)"
    rm -f "$log"
    echo "$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.3f", a - b }') ${tpc:-0} ${pmu:-none}"
}

# linux_once CONFIG PMU: one boot of the headless Linux guest with pmu=PMU; prints its
# "perf run ..." line (without the prefix).
linux_once() {
    local config="$1" pmu="$2" cmd log line
    emulator "$config"
    log="$(mktemp)"
    emu_lock
    "${cmd[@]}" --headless --timeout 900 --elf "$ELF" --no-default-guest \
        --module "$KERNEL=linux mem=256M pmu=$pmu -- console=ttyS0 panic=-1 linux_guest_compute=1 linux_guest_forks=1 linux_guest_parallel=1 linux_guest_perf=10 linux_guest_perf_run=$LOOP" \
        --module "$INITRD=linux:initrd" >"$log" 2>/dev/null ||
        { emu_unlock; tail -20 "$log" >&2; die "$config Linux run failed (pmu=$pmu)"; }
    emu_unlock
    line="$(sed -n 's/.*linux-guest: perf run \(.*\)$/\1/p' "$log" | tr -d '\r' | head -n 1)"
    rm -f "$log"
    [[ -n "$line" ]] || die "$config: the Linux guest printed no perf run line (pmu=$pmu)"
    echo "$line"
}

min_of() { sort -g | head -n 1; }
# Host microseconds per call; n/a when the calls took no measurable time over the base boot
# (host noise larger than the calls: Bochs with few calls).
per_call() { awk -v l="$1" -v b="$2" -v n="$N" 'BEGIN { if (l > b) printf "%.2f", (l - b) * 1000000 / n; else print "n/a" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.3f", a / b; else print "n/a" }'; }
field_of() { sed -n "s/.*\\b$1=\\([0-9]*\\).*/\\1/p" <<<"$2"; }

status=0
for config in "${CONFIGS[@]}"; do
    declare -A secs=() tscs=()
    base=()
    last_pmu=""
    for r in $(seq "$REPEATS"); do
        note "$config: round $r of $REPEATS"
        read -r s _ < <(run_once "$config" 0 pmu=off)
        base+=("$s")
        for m in "${MODES[@]}"; do
            read -r s t p < <(run_once "$config" "$N" "${MODE_WORDS[$m]}")
            secs[$m]+="$s "
            tscs[$m]+="$t "
            if [[ "$m" == count ]]; then
                last_pmu="$p"
                hc="$(field_of hypercall_exits "$p")"
                if [[ "$hc" != "$N" ]]; then
                    note "$config: the counting boot saw ${hc:-no} hypercall exit events, not $N: $p"
                    status=1
                fi
            fi
        done
    done
    b="$(printf '%s\n' "${base[@]}" | min_of)"
    declare -A us=() tsc=()
    for m in "${MODES[@]}"; do
        # shellcheck disable=SC2086 # word splitting wanted: one figure per repeat
        tsc[$m]="$(printf '%s\n' ${tscs[$m]} | min_of)"
        # shellcheck disable=SC2086
        us[$m]="$(per_call "$(printf '%s\n' ${secs[$m]} | min_of)" "$b")"
    done
    echo "config=$config calls=$N repeats=$REPEATS base_s=$b"
    printf '%-6s %12s %12s %12s %12s\n' mode tsc_per_call tsc_vs_off host_us_call host_vs_off
    for m in "${MODES[@]}"; do
        printf '%-6s %12s %12s %12s %12s\n' "$m" "${tsc[$m]}" "$(ratio "${tsc[$m]}" "${tsc[off]}")" \
            "${us[$m]}" "$(ratio "${us[$m]}" "${us[off]}")"
    done
    echo "counting boot's counters (last round): $last_pmu"
    echo "world-switch cost of counting: $(awk -v c="${tsc[count]}" -v o="${tsc[off]}" \
        'BEGIN { printf "%d", c - o }') guest TSC ticks per round trip over pmu=off"
    unset secs tscs us tsc
done

if [[ "$LINUX" == 1 ]]; then
    guest="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)" || die "preparing the Linux guest failed"
    KERNEL="$(sed -n 's/^kernel=//p' <<<"$guest")"
    INITRD="$(sed -n 's/^initrd_headless=//p' <<<"$guest")"
    for config in "${CONFIGS[@]}"; do
        off=() on=()
        last=""
        for r in $(seq "$REPEATS"); do
            note "$config: Linux round $r of $REPEATS"
            off+=("$(field_of elapsed_ns "$(linux_once "$config" off)")")
            last="$(linux_once "$config" on)"
            on+=("$(field_of elapsed_ns "$last")")
            [[ "$(field_of cycles "$last")" -gt 0 ]] 2>/dev/null || { note "$config: no cycles counted: $last"; status=1; }
        done
        o="$(printf '%s\n' "${off[@]}" | min_of)"
        c="$(printf '%s\n' "${on[@]}" | min_of)"
        echo "config=$config linux shell loop to $LOOP, guest elapsed ms (min of $REPEATS):" \
            "pmu=off $(awk -v v="$o" 'BEGIN { printf "%.1f", v / 1e6 }')" \
            "perf-counting $(awk -v v="$c" 'BEGIN { printf "%.1f", v / 1e6 }')" \
            "ratio $(ratio "$c" "$o")"
        echo "last counting run: $last"
    done
fi
exit "$status"
