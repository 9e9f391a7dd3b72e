#!/usr/bin/env bash
# Boot-to-userspace time of the default Debian guest under Vireo against the same kernel and
# initramfs booted directly by the same emulator, as a ratio over several runs; plus the
# exit table of one boot under Vireo.
#
# Both sides are timed from the emulator's start to the guest's `linux-guest: init_uptime`
# line (its /init running) by timestamping the serial output as it streams, and under Vireo
# also from the VM's start line to that line, and Vireo's own part (its first line to the VM's
# start; guest RAM is populated lazily, so it no longer grows with the VM's size). The workload
# after that point is excluded: it measures the guest, not the boot.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
TIMING=both
VIREO_CMDLINE=()
ELF=""
usage() {
    cat <<EOF2
Usage: scripts/bench-linux-boot.sh [--runs N] [--timing wall|icount|both] [--cmdline "HYPERVISOR ARGS"] [--elf FILE]

--timing: wall: host wall clock (multi-threaded TCG), from the serial lines' arrival;
          icount: guest time under QEMU -icount shift=0,sleep=off (single-threaded TCG; the
          TSC then counts executed instructions, so host load does not move the figures),
          from TSC readings: Vireo's first line and VM start line (tsc=) and the guest's
          "linux-guest: init_tsc" line (read by /bin/perfprobe tsc as /init starts);
          both (default): a wall-clock and an icount pair per run.
--cmdline: Vireo's command line for its runs (the guest's kernel command line stays the same).
--elf: a Vireo ELF built before (e.g. of another commit, to compare) instead of building one.

QEMU TCG SVM only (the native side needs an emulator that boots Linux directly: QEMU's
-kernel). Both sides: -cpu qemu64,+svm,+npt, 256 MiB for the guest (native: -m 256; Vireo:
QEMU -m 512, the VM mem=256M), the same kernel, initramfs and kernel command line. Prints
per timing the native and Vireo times (median), the ratio, Vireo's own part, and the exit
table of the last boot under Vireo; with wall-clock timing also the emulator's floor: its
world-switch round trip (a floor=on boot of the self-test guest) times the boot's exits,
against the difference Vireo - native.

Environment: VIREO_EMU_LOCK=FILE holds flock FILE around each native/Vireo pair of runs.
EOF2
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --runs) need_arg "$1" "$#"; RUNS="$2"; shift ;;
        --timing) need_arg "$1" "$#"; TIMING="$2"; shift ;;
        --cmdline) need_arg "$1" "$#"; VIREO_CMDLINE=(--cmdline "$2"); shift ;;
        --elf) need_arg "$1" "$#"; ELF="$(realpath "$2")"; shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
case "$TIMING" in
    wall) MODES=(wall) ;;
    icount) MODES=(icount) ;;
    both) MODES=(wall icount) ;;
    *) usage_error "--timing: wall, icount or both, not '$TIMING'" ;;
esac

"$VIREO_ROOT/scripts/install-deps.sh" --quiet all
out="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)"
KERNEL="$(sed -n 's/^kernel=//p' <<<"$out")"
INITRD="$(sed -n 's/^initrd_headless=//p' <<<"$out")"
[[ -n "$ELF" ]] || ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"
APPEND="console=ttyS0 panic=-1 linux_guest_compute=20000 linux_guest_forks=50"

# time_to_init CMD...: seconds from start to the first 'linux-guest: init_uptime' line.
# time_to_init COMMAND...: runs COMMAND and prints "T_INIT T_FIRST T_START": seconds from the
# start to the guest's "linux-guest: init_uptime" line, to Vireo's first line ("vireo:
# starting") and to the VM's start line (the last two "-" for a native boot).
time_to_init() {
    python3 - "$@" <<'PY'
import os, subprocess, sys, time
t0 = time.time()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
hit = first = start = None
log = []
for line in p.stdout:
    log.append(line)
    now = time.time() - t0
    if first is None and line.startswith("vireo: starting"):
        first = now
    if start is None and "vireo: vm name=linux start" in line:
        start = now
    if hit is None and "linux-guest: init_uptime" in line:
        hit = now
p.wait()
if hit is None:
    sys.stderr.write("".join(log[-30:]))
    sys.exit("no linux-guest: init_uptime line")
f = lambda x: "-" if x is None else f"{x:.3f}"
print(f"{hit:.3f} {f(first)} {f(start)}")
with open(os.environ["BENCH_LOG"], "w") as out:
    out.write("".join(log))
PY
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# tsc_times LOG: from a boot's serial log, "NATIVE_TICKS" (native: the guest's init_tsc) or
# "VM_TO_INIT_TICKS PART_TICKS" (under Vireo: init_tsc - the VM start line's tsc=, and the
# VM start's tsc= - Vireo's first line's tsc=). The guest's TSC is the host's under Vireo (no
# TSC offset), so both are on one clock.
tsc_times() {
    python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
init = re.search(r"linux-guest: init_tsc (\d+)", text)
start = re.search(r"vireo: vm name=linux start .* tsc=(\d+)", text)
first = re.search(r"vireo: starting .* tsc=(\d+)", text)
if not init:
    sys.exit("no linux-guest: init_tsc line")
if start and first:
    print(int(init.group(1)) - int(start.group(1)), int(start.group(1)) - int(first.group(1)))
else:
    print(init.group(1))
PY
}

ICOUNT=(-icount "shift=0,sleep=off")
# Each boot's serial log, kept for the exit tables (a directory of this run's own: benchmarks
# may run side by side).
LOGS="$(mktemp -d /tmp/vireo-bench-linux.XXXXXX)"
export BENCH_LOG="$LOGS/last.log"
declare -A native vireo part vm_to_init
for mode in "${MODES[@]}"; do native[$mode]="" vireo[$mode]="" part[$mode]="" vm_to_init[$mode]=""; done
for _ in $(seq "$RUNS"); do
    for mode in "${MODES[@]}"; do
        # Each native/Vireo pair under one hold of the emulator lock (VIREO_EMU_LOCK): the two
        # are compared, so they should see the same machine.
        emu_lock
        if [[ "$mode" == wall ]]; then
            read -r t _ _ < <(time_to_init timeout 300 qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt -m 256 -display none \
                -serial stdio -no-reboot -nic none -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND")
            native[$mode]+="$t "
            read -r t first start < <(time_to_init timeout 300 "$VIREO_ROOT/scripts/run-qemu.sh" --headless --timeout 280 --elf "$ELF" ${VIREO_CMDLINE[@]+"${VIREO_CMDLINE[@]}"} \
                --module "$KERNEL=linux mem=256M -- $APPEND" --module "$INITRD=linux:initrd")
            vireo[$mode]+="$t "
            part[$mode]+="$(awk -v a="$first" -v b="$start" 'BEGIN { printf "%.3f", b - a }') "
            vm_to_init[$mode]+="$(awk -v a="$start" -v b="$t" 'BEGIN { printf "%.3f", b - a }') "
            cp "$BENCH_LOG" "$LOGS/vireo-wall.log"
        else
            # Guest time: TSC ticks, which under -icount shift=0 are virtual nanoseconds.
            time_to_init timeout 600 qemu-system-x86_64 -accel tcg,thread=single -cpu qemu64,+svm,+npt -m 256 -display none \
                -serial stdio -no-reboot -nic none -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" "${ICOUNT[@]}" >/dev/null
            t="$(tsc_times "$BENCH_LOG")"
            native[$mode]+="$(awk -v t="$t" 'BEGIN { printf "%.3f", t / 1e9 }') "
            VIREO_TCG_THREAD=single time_to_init timeout 600 "$VIREO_ROOT/scripts/run-qemu.sh" --headless --timeout 580 --elf "$ELF" ${VIREO_CMDLINE[@]+"${VIREO_CMDLINE[@]}"} \
                --module "$KERNEL=linux mem=256M -- $APPEND" --module "$INITRD=linux:initrd" -- "${ICOUNT[@]}" >/dev/null
            read -r g p < <(tsc_times "$BENCH_LOG")
            vm_to_init[$mode]+="$(awk -v t="$g" 'BEGIN { printf "%.3f", t / 1e9 }') "
            part[$mode]+="$(awk -v t="$p" 'BEGIN { printf "%.3f", t / 1e9 }') "
            cp "$BENCH_LOG" "$LOGS/vireo-icount.log"
        fi
        emu_unlock
    done
done
for mode in "${MODES[@]}"; do
    n="$(printf '%s\n' ${native[$mode]} | median)"
    p="$(printf '%s\n' ${part[$mode]} | median)"
    g="$(printf '%s\n' ${vm_to_init[$mode]} | median)"
    if [[ "$mode" == wall ]]; then
        v="$(printf '%s\n' ${vireo[$mode]} | median)"
        echo "== timing: host wall clock (multi-threaded TCG), seconds"
        echo "native (QEMU -kernel), start to /init:   ${native[$mode]} median $n s"
        echo "under Vireo, emulator start to /init:    ${vireo[$mode]} median $v s"
    else
        echo "== timing: guest time under -icount shift=0,sleep=off (TSC: executed instructions), seconds"
        echo "native (QEMU -kernel), start to /init:   ${native[$mode]} median $n s"
    fi
    echo "under Vireo, VM start to /init:          ${vm_to_init[$mode]} median $g s"
    echo "Vireo's own part (first line to VM start): ${part[$mode]} median $p s  (target < 0.2 s)"
    awk -v n="$n" -v g="$g" 'BEGIN { printf "ratio (VM start to /init under Vireo / native): %.2f  (target <= 1.3)\n", g / n }'
    # Per-run ratios (each pair from one lock hold), for the spread.
    paste -d' ' <(printf '%s\n' ${vm_to_init[$mode]}) <(printf '%s\n' ${native[$mode]}) |
        awk '{ printf "%s%.2f", (NR > 1 ? " " : "per-run ratios: "), $1 / $2 } END { print "" }'
    log="$LOGS/vireo-$mode.log"
    echo "exit table of the last boot under Vireo ($mode; under icount, cycles are instructions):"
    grep -E "vireo: vm name=linux (end|exit reason|memory)" "$log" || true
done
if [[ " ${MODES[*]} " == *" wall "* ]]; then
    # How much of the wall-clock difference the emulator's own world switch accounts for: the
    # floor's hypercall round trip (floor=on: the backend answers PING with nothing but the RIP
    # advance and re-entry, as a minimal hypervisor would) times the boot's exits. QEMU TCG
    # flushes its software TLB at every VMRUN and #VMEXIT, so every exit also costs refilling
    # the guest's working set through the nested walk; the floor's tiny guest refills little,
    # so this is a lower bound of what the exits cost a Linux guest.
    emu_lock
    "$VIREO_ROOT/scripts/run-qemu.sh" --headless --timeout 280 --elf "$ELF" \
        --guest "selftest=bench bench=20000 floor=on" >"$LOGS/floor.log" 2>&1 || true
    emu_unlock
    python3 - "$LOGS/floor.log" "$LOGS/vireo-wall.log" "$(printf '%s\n' ${native[wall]} | median)" \
        "$(printf '%s\n' ${vm_to_init[wall]} | median)" <<'PY'
import re, sys
floor, vireo = (open(p, errors="replace").read() for p in sys.argv[1:3])
native, under = float(sys.argv[3]), float(sys.argv[4])
tpc = re.search(r"tsc_per_call=(\d+)", floor)
hz = re.search(r"vireo: time tsc_hz=(\d+)", vireo)
exits = re.search(r"vireo: vm name=linux end .*exits=(\d+)", vireo)
if not (tpc and hz and exits):
    sys.exit("floor estimate: a line is missing (floor run or Vireo wall log): see " + sys.argv[1])
tpc, hz, exits = int(tpc.group(1)), int(hz.group(1)), int(exits.group(1))
floor_s = exits * tpc / hz
diff = under - native
print(f"emulator floor: {tpc} TSC ticks per world-switch round trip (floor=on PING) x {exits} exits "
      f"= {floor_s:.3f} s; Vireo - native = {diff:.3f} s (medians)"
      + (f": the floor is {100 * floor_s / diff:.0f}% of it" if diff > 0 else ""))
PY
fi
echo "serial logs of the last boots: $LOGS"
