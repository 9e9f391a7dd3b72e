#!/usr/bin/env bash
# SMP figures of Vireo in QEMU TCG (AMD SVM emulated), each side measured in the same run,
# interleaved, REPEATS times; medians with the spread (min..max). No pass/fail on timing.
#
# 1. Parallel scaling (--part scaling). The headless Debian guest with
#    linux_guest_bench=scaling (guests/linux/init-headless.sh) runs its shell compute loop
#    (--loop N iterations) once alone (t1), then two copies at once (t2), --rounds times per
#    boot, timed inside the guest from /proc/uptime (10 ms steps; busybox's date has no %N).
#    Parallel speedup = 2 * t1 / t2: 2.0 if the two copies really ran on two CPUs, 1.0 if
#    they shared one. Once natively (QEMU -kernel, -smp 2, the same TCG options as
#    run-qemu.sh) and once under Vireo (a 2-vCPU VM on 2 host CPUs), alternately. Printed:
#    both speedups (median over every round of every boot) and the ratio native / Vireo of
#    the medians (1.0: Vireo scales like the bare emulator; aim: within 1.1). The same from
#    the host's clock as a check of the guest's: when the guest's "bench mark" lines reach
#    the console (native: QEMU's stdout; Vireo: run-qemu.sh's stream, 0.1 s steps).
# 2. IPI round trip (--part ipi). The self-test guest with `cpus=2 ipibench=N`: the BSP
#    sends a fixed IPI to AP 1, whose handler answers with a fixed IPI to the BSP; N round
#    trips timed with the guest's TSC, converted to ns with the TSC rate in CPUID 0x16
#    (guests/selftest/src/smp.rs, `ipi_bench`). Run with the two vCPUs on two host CPUs
#    (--smp 2: "placed host_cpus=0,1") and time-sliced on one (--smp 1: "host_cpus=0,0").
#    Printed: the mean and median round trip of each run, medians over the runs.
# 3. Time-slice switch cost (--part slice). Two VMs spinning with interrupts on
#    (`mode=spin-sti`) on one host CPU (--smp 1) for --spin seconds each, with the default
#    slice (5 ms) and with each --slice given. From Vireo's per-vCPU lines at the VMs' end
#    (`slices`, `run_us`, `steal_us`; run = from picking the vCPU to the return of its run
#    loop, steal = runnable but waiting) and the exit table:
#      wall W = (sum run + sum steal) / 2 (each vCPU's waits are the other's runs plus two
#        scheduler passes, so sum steal = sum run + 2 * scheduler time; W = sum run + that);
#      switches/s = sum slices / W;
#      sched_us/switch = (W - sum run) / sum slices: the scheduler loop between two slices;
#      exit_us/switch = exit-handling cycles (all exits; nearly all are the host timer's
#        external_interrupt that ends the slice) / sum slices, at the tsc_hz Vireo reports;
#      overhead = (W - sum run + exit time) / W: the share of the CPU not spent in a guest
#        (world switches themselves, VMRUN/#VMEXIT, are not in it: neither side of them
#        timestamps them).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPEATS=3
LOOP=100000
ROUNDS=2
IPIS=500
SPIN=3
SLICES=()
PARTS=()
TIMEOUT=180

usage() {
    cat <<EOF2
Usage: scripts/bench-smp.sh [OPTIONS]

SMP figures of Vireo in QEMU TCG, both sides of each comparison measured in this run,
interleaved: parallel scaling of a Linux guest (native QEMU -smp 2 vs a 2-vCPU VM under
Vireo on 2 host CPUs), guest-measured IPI round trips (vCPUs on 2 host CPUs vs 1), and the
cost of a time-slice switch (two spinning VMs on 1 host CPU, per slice length). The method
of each is in this script's header.

Options:
  --part scaling|ipi|slice  run only this part (repeatable; default: all three)
  --repeats R               boots per configuration (default $REPEATS)
  --loop N                  iterations of the guest's compute loop (default $LOOP)
  --rounds K                alone/two-at-once rounds per Linux boot (default $ROUNDS)
  --ipis N                  IPI round trips per self-test boot (default $IPIS)
  --spin S                  seconds each spinning VM runs (default $SPIN)
  --slice DURATION          a slice length to compare with the default 5ms, as Vireo's
                            slice= key takes it (repeatable; default: 2ms and 1ms)
  --timeout S               limit of each boot in seconds (default $TIMEOUT)
  -h, --help                this text

Figures go to stdout; progress and failures (with the serial lines that show them) to stderr.
Exit status 0 if every part gave its figures, 1 if a part could not be measured.
EOF2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --part)
            need_arg "$1" "$#"
            case "$2" in scaling|ipi|slice) PARTS+=("$2") ;; *) usage_error "--part wants scaling, ipi or slice, not '$2'" ;; esac
            shift ;;
        --repeats|--loop|--rounds|--ipis|--spin|--timeout)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] || usage_error "$1 wants a positive number, not '$2'"
            case "$1" in
                --repeats) REPEATS="$2" ;;
                --loop) LOOP="$2" ;;
                --rounds) ROUNDS="$2" ;;
                --ipis) IPIS="$2" ;;
                --spin) SPIN="$2" ;;
                --timeout) TIMEOUT="$2" ;;
            esac
            shift ;;
        --slice)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[0-9]+(us|ms|s)$ ]] || usage_error "--slice wants e.g. 1ms or 500us, not '$2'"
            SLICES+=("$2"); shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(scaling ipi slice)
[[ ${#SLICES[@]} -gt 0 ]] || SLICES=(2ms 1ms)

"$VIREO_ROOT/scripts/install-deps.sh" --quiet all
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-bench-smp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
FAILED=0

has_part() {
    local p
    for p in "${PARTS[@]}"; do [[ "$p" == "$1" ]] && return 0; done
    return 1
}

# stats: numbers on stdin -> "median min..max (n=N)"
stats() {
    python3 -c '
import sys
v = sorted(float(x) for x in sys.stdin.read().split())
if not v:
    print("n/a"); sys.exit()
n = len(v)
m = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
f = lambda x: ("%.3f" % x) if abs(x) < 10 else ("%.1f" % x) if abs(x) < 1000 else ("%.0f" % x)
print(f"{f(m)}  ({f(v[0])}..{f(v[-1])}, n={n})")'
}
median() { stats | awk '{print $1}'; }

# vireo_run LOG LIMIT ARGS...: one headless boot of Vireo (the ELF built above), killed after
# LIMIT seconds; the serial log in LOG. Sets VIREO_RC (run-qemu.sh's status; 124: timeout).
vireo_run() {
    local log="$1" limit="$2"
    shift 2
    VIREO_RC=0
    "$VIREO_ROOT/scripts/run-qemu.sh" --headless --accel tcg --timeout "$limit" --elf "$ELF" --log "$log" "$@" \
        >/dev/null 2>&1 || VIREO_RC=$?
    [[ -f "$log" ]] || : >"$log"
}

# stamped OUT CMD...: runs CMD; each line of its stdout goes to OUT prefixed with the seconds
# since the start at which it arrived (the host's clock, to check the guest's).
stamped() {
    local out="$1"
    shift
    python3 - "$out" "$@" <<'PY' || true
import subprocess, sys, time
t0 = time.monotonic()
with open(sys.argv[1], "w") as f:
    p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, errors="replace")
    for line in p.stdout:
        f.write("%.3f %s" % (time.monotonic() - t0, line.replace("\r", "")))
    p.wait()
PY
}

# evidence LOG PATTERN: the serial lines that show what went wrong, to stderr.
evidence() {
    note "  serial evidence ($(serial_clean "$1" | grep -ac .) lines; last relevant ones):"
    serial_clean "$1" | grep -aE "$2" | tail -n 8 | sed 's/^/    /' >&2 || true
}

# ---- 1. parallel scaling ------------------------------------------------------------------
part_scaling() {
    local out kernel initrd append r log nat=() vir=() t1 t2 line vireo_broken=0
    out="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)"
    kernel="$(sed -n 's/^kernel=//p' <<<"$out")"
    initrd="$(sed -n 's/^initrd_headless=//p' <<<"$out")"
    append="console=ttyS0 panic=-1 linux_guest_bench=scaling linux_guest_bench_n=$LOOP linux_guest_bench_reps=$ROUNDS"
    echo "== parallel scaling: shell loop of $LOOP iterations, alone (t1) then 2 copies at once (t2); speedup = 2*t1/t2 (ideal 2.0)"
    echo "   kernel cmdline: $append"
    # rounds LOG: "t1 t2" per bench line of the guest.
    # rounds LOG: "t1 t2 host_t1 host_t2" (ms) per round: the guest's figures, and the host's
    # from when the mark lines arrived.
    rounds() {
        serial_clean "$1" | awk '
            /^[0-9.]+ .*linux-guest: bench mark / && !seen[$0]++ {
                r = $0; sub(/.*round=/, "", r); sub(/ .*/, "", r)
                p = $0; sub(/.*phase=/, "", p); sub(/[^a-z].*/, "", p)
                if (!((r, p) in at)) at[r, p] = $1
            }
            /linux-guest: bench scaling / {
                r = $0; sub(/.*rep=/, "", r); sub(/ .*/, "", r)
                if (done[r]++) next
                a = $0; sub(/.*t1_ms=/, "", a); sub(/ .*/, "", a)
                b = $0; sub(/.*t2_ms=/, "", b); sub(/[^0-9].*/, "", b)
                h1 = ((r, "pair") in at && (r, "alone") in at) ? (at[r, "pair"] - at[r, "alone"]) * 1000 : 0
                h2 = ((r, "end") in at && (r, "pair") in at) ? (at[r, "end"] - at[r, "pair"]) * 1000 : 0
                printf "%d %d %d %d\n", a, b, h1, h2
            }'
    }
    for r in $(seq "$REPEATS"); do
        log="$WORK/native-$r.log"
        note "scaling: native boot $r/$REPEATS"
        stamped "$log" timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu qemu64,+svm,+npt -m 512 -smp 2 \
            -display none -serial stdio -monitor none -parallel none -no-reboot -nic none \
            -kernel "$kernel" -initrd "$initrd" -append "$append"
        while read -r t1 t2 h1 h2; do
            nat+=("$t1 $t2 $h1 $h2")
            printf '   native run %d: guest clock t1=%5d ms t2=%5d ms speedup %.3f | host clock t1=%5d ms t2=%5d ms speedup %.3f\n' \
                "$r" "$t1" "$t2" "$(awk -v a="$t1" -v b="$t2" 'BEGIN { print 2 * a / b }')" "$h1" "$h2" "$(awk -v a="$h1" -v b="$h2" 'BEGIN { print b ? 2 * a / b : 0 }')"
        done < <(rounds "$log")
        [[ "$(rounds "$log" | wc -l)" -gt 0 ]] || { note "scaling: native boot $r gave no bench lines"; evidence "$log" 'linux-guest|Kernel panic|smp'; }
        if [[ "$vireo_broken" == 1 ]]; then
            continue
        fi
        log="$WORK/vireo-scaling-$r.log"
        note "scaling: Vireo boot $r/$REPEATS (2 vCPUs on 2 host CPUs)"
        # run-qemu.sh streams the serial log every 0.1 s: host times are +-0.1 s here.
        stamped "$log" "$VIREO_ROOT/scripts/run-qemu.sh" --headless --accel tcg --timeout "$TIMEOUT" --elf "$ELF" \
            --log "$log.serial" --smp 2 --module "$kernel=linux mem=256M cpus=2 -- $append" --module "$initrd=linux:initrd"
        [[ -f "$log.serial" ]] && cat "$log.serial" >>"$log"
        while read -r t1 t2 h1 h2; do
            vir+=("$t1 $t2 $h1 $h2")
            printf '   Vireo  run %d: guest clock t1=%5d ms t2=%5d ms speedup %.3f | host clock t1=%5d ms t2=%5d ms speedup %.3f\n' \
                "$r" "$t1" "$t2" "$(awk -v a="$t1" -v b="$t2" 'BEGIN { print 2 * a / b }')" "$h1" "$h2" "$(awk -v a="$h1" -v b="$h2" 'BEGIN { print b ? 2 * a / b : 0 }')"
        done < <(rounds "$log")
        serial_clean "$log" | grep -a 'linux-guest: bench start' | head -n 1 | sed 's/.*linux-guest: /   Vireo  guest: /' || true
        if [[ "$(rounds "$log" | wc -l)" -eq 0 ]]; then
            note "scaling: the Vireo boot $r gave no bench lines; not booting it again (each would wait $TIMEOUT s)"
            evidence "$log" 'linux-guest|smp|SMP|x86: Booting|vireo: vm name=linux (end|vcpu|last-exit)|exit status|Kernel panic|watchdog|stuck'
            echo "   Vireo  run $r: no figures (see stderr)"
            vireo_broken=1
        fi
    done
    local ns vs hn hv
    ns="$(printf '%s\n' "${nat[@]+"${nat[@]}"}" | awk 'NF == 4 { print 2 * $1 / $2 }')"
    vs="$(printf '%s\n' "${vir[@]+"${vir[@]}"}" | awk 'NF == 4 { print 2 * $1 / $2 }')"
    hn="$(printf '%s\n' "${nat[@]+"${nat[@]}"}" | awk 'NF == 4 && $4 > 0 { print 2 * $3 / $4 }')"
    hv="$(printf '%s\n' "${vir[@]+"${vir[@]}"}" | awk 'NF == 4 && $4 > 0 { print 2 * $3 / $4 }')"
    echo "   native t1_ms: $(printf '%s\n' "${nat[@]+"${nat[@]}"}" | awk 'NF == 4 { print $1 }' | stats)   t2_ms: $(printf '%s\n' "${nat[@]+"${nat[@]}"}" | awk 'NF == 4 { print $2 }' | stats)"
    echo "   Vireo  t1_ms: $(printf '%s\n' "${vir[@]+"${vir[@]}"}" | awk 'NF == 4 { print $1 }' | stats)   t2_ms: $(printf '%s\n' "${vir[@]+"${vir[@]}"}" | awk 'NF == 4 { print $2 }' | stats)"
    echo "   native speedup (guest clock): $(stats <<<"$ns")   (host clock): $(stats <<<"$hn")"
    echo "   Vireo  speedup (guest clock): $(stats <<<"$vs")   (host clock): $(stats <<<"$hv")"
    if [[ -n "$ns" && -n "$vs" ]]; then
        awk -v n="$(median <<<"$ns")" -v v="$(median <<<"$vs")" -v hn="$(median <<<"$hn")" -v hv="$(median <<<"$hv")" \
            'BEGIN { printf "   scaling ratio native/Vireo (medians): guest clock %.3f, host clock %.3f   (1.0 = same scaling; aim <= 1.1)\n", n / v, (hv > 0 ? hn / hv : 0) }'
    else
        echo "   scaling ratio native/Vireo: n/a"
        FAILED=1
    fi
}

# ---- 2. IPI round trip --------------------------------------------------------------------
part_ipi() {
    local r smp log line mean med placed
    declare -A means=() meds=()
    echo "== IPI round trip BSP -> AP 1 -> BSP, guest TSC, $IPIS round trips per boot (selftest cpus=2 ipibench=$IPIS)"
    for r in $(seq "$REPEATS"); do
        for smp in 2 1; do
            log="$WORK/ipi-$smp-$r.log"
            note "ipi: boot $r/$REPEATS with --smp $smp"
            vireo_run "$log" 120 --smp "$smp" --guest "selftest=ipi cpus=2 ipibench=$IPIS"
            placed="$(serial_clean "$log" | sed -n 's/.*vm name=ipi placed host_cpus=\([0-9,]*\).*/\1/p' | head -n 1)"
            line="$(serial_clean "$log" | grep -a 'selftest: ipi_round_trip' | head -n 1 || true)"
            if [[ "$line" == *" ns="* ]]; then
                mean="$(sed -n 's/.* ns=\([0-9]*\).*/\1/p' <<<"$line")"
                med="$(sed -n 's/.* median_ns=\([0-9]*\).*/\1/p' <<<"$line")"
                means[$smp]+="$mean "
                meds[$smp]+="$med "
                printf '   host CPUs %d (placed %s) run %d: %s\n' "$smp" "${placed:-?}" "$r" "${line#*selftest: }"
            else
                echo "   host CPUs $smp (placed ${placed:-?}) run $r: no figure: ${line:-no ipi_round_trip line}"
                evidence "$log" 'ipi_round_trip|vireo: vm name=ipi (end|exit reason|vcpu)|exit status'
                FAILED=1
            fi
        done
    done
    for smp in 2 1; do
        local what="vCPUs on 2 host CPUs"
        [[ "$smp" == 2 ]] || what="vCPUs on 1 host CPU "
        echo "   $what: mean_us $(tr ' ' '\n' <<<"${means[$smp]:-}" | awk 'NF { print $1 / 1000 }' | stats)   median_us $(tr ' ' '\n' <<<"${meds[$smp]:-}" | awk 'NF { print $1 / 1000 }' | stats)"
    done
}

# ---- 3. time-slice switch cost ------------------------------------------------------------
part_slice() {
    local sl r log fig
    declare -A col=() hung=()
    echo "== time-slice switches: 2 VMs spinning (mode=spin-sti) on 1 host CPU for $SPIN s"
    echo "   slice   run  slices  switch/s  sched_us/sw  exit_us/sw  overhead%"
    for r in $(seq "$REPEATS"); do
        for sl in 5ms "${SLICES[@]}"; do
            log="$WORK/slice-$sl-$r.log"
            note "slice: boot $r/$REPEATS with slice=$sl"
            # The VMs end after SPIN s; the rest is boot time (well under 40 s even when busy).
            vireo_run "$log" $((SPIN * 2 + 40)) --smp 1 --cmdline "slice=$sl" \
                --guest "selftest=a mode=spin-sti timeout=$SPIN expect=timed-out" \
                --guest "selftest=b mode=spin-sti timeout=$SPIN expect=timed-out"
            fig="$(serial_clean "$log" | python3 -c '
import re, sys
hz, run, steal, slices, cyc, vms = 0, 0, 0, 0, 0, set()
for line in sys.stdin:
    m = re.search(r"vireo: time tsc_hz=(\d+)", line)
    if m: hz = int(m.group(1))
    m = re.search(r"vireo: vm name=(\w+) vcpu=\d+ exits=\d+ slices=(\d+) run_us=(\d+) steal_us=(\d+)", line)
    if m:
        vms.add(m.group(1)); slices += int(m.group(2)); run += int(m.group(3)); steal += int(m.group(4))
    m = re.search(r"vireo: vm name=\w+ exit reason=\S+ count=\d+ cycles=(\d+)", line)
    if m: cyc += int(m.group(1))
if len(vms) != 2 or not hz or not slices:
    sys.exit(1)
w = (run + steal) / 2
exit_us = cyc / hz * 1e6
print("%d %.1f %.2f %.2f %.3f %d" % (slices, slices / w * 1e6, (w - run) / slices, exit_us / slices, 100 * (w - run + exit_us) / w, w))
')" || fig=""
            if [[ -z "$fig" ]]; then
                if [[ "$VIREO_RC" == 124 ]]; then
                    echo "   $sl run $r: no figures: a VM did not end at its $SPIN s limit (run killed after $((SPIN * 2 + 40)) s)"
                    hung[$sl]=$((${hung[$sl]:-0} + 1))
                else
                    echo "   $sl run $r: no figures (the per-vCPU lines of both VMs are missing; run-qemu status $VIREO_RC)"
                fi
                evidence "$log" 'vireo: vm name=(a|b) |exit status|cmdline error'
                FAILED=1
                continue
            fi
            read -r s sw sch ex ov w <<<"$fig"
            printf '   %-6s %4d %7d %9.1f %12.2f %11.2f %10.3f   (wall %.3f s)\n' "$sl" "$r" "$s" "$sw" "$sch" "$ex" "$ov" "$(awk -v w="$w" 'BEGIN { print w / 1e6 }')"
            col[$sl.sw]+="$sw " col[$sl.sch]+="$sch " col[$sl.ex]+="$ex " col[$sl.ov]+="$ov "
        done
    done
    for sl in 5ms "${SLICES[@]}"; do
        echo "   slice=$sl: switches/s $(tr ' ' '\n' <<<"${col[$sl.sw]:-}" | stats)"
        echo "              sched_us/switch $(tr ' ' '\n' <<<"${col[$sl.sch]:-}" | stats)   exit_us/switch $(tr ' ' '\n' <<<"${col[$sl.ex]:-}" | stats)"
        echo "              overhead % $(tr ' ' '\n' <<<"${col[$sl.ov]:-}" | stats)   runs that never ended: ${hung[$sl]:-0} of $REPEATS"
    done
}

note "ELF $ELF; repeats $REPEATS; parts ${PARTS[*]}"
echo "bench-smp: QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{ print $4 }') TCG, host $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
has_part scaling && part_scaling
has_part ipi && part_ipi
has_part slice && part_slice
echo "bench-smp: done (load $(cut -d' ' -f1-3 /proc/loadavg))"
exit "$FAILED"
