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
VIREO_CMDLINE=()
ELF=""
usage() {
    cat <<EOF2
Usage: scripts/bench-linux-boot.sh [--runs N] [--cmdline "HYPERVISOR ARGS"] [--elf FILE]

--cmdline: Vireo's command line for its runs (the guest's kernel command line stays the same).
--elf: a Vireo ELF built before (e.g. of another commit, to compare) instead of building one.

QEMU TCG SVM only (the native side needs an emulator that boots Linux directly: QEMU's
-kernel). Prints the native and Vireo times (median), the ratio, and Vireo's exit table.

Environment: VIREO_EMU_LOCK=FILE holds flock FILE around each native/Vireo pair of runs.
EOF2
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --runs) need_arg "$1" "$#"; RUNS="$2"; shift ;;
        --cmdline) need_arg "$1" "$#"; VIREO_CMDLINE=(--cmdline "$2"); shift ;;
        --elf) need_arg "$1" "$#"; ELF="$(realpath "$2")"; shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done

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
import subprocess, sys, time
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
with open("/tmp/vireo-bench-linux-last.log", "w") as out:
    out.write("".join(log))
PY
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

native=() vireo=() part=() vm_to_init=()
for _ in $(seq "$RUNS"); do
    # Each native/Vireo pair under one hold of the emulator lock (VIREO_EMU_LOCK): the two are
    # compared, so they should see the same machine.
    emu_lock
    read -r t _ _ < <(time_to_init timeout 300 qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt -m 512 -display none \
        -serial stdio -no-reboot -nic none -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND")
    native+=("$t")
    read -r t first start < <(time_to_init timeout 300 "$VIREO_ROOT/scripts/run-qemu.sh" --headless --timeout 280 --elf "$ELF" ${VIREO_CMDLINE[@]+"${VIREO_CMDLINE[@]}"} \
        --module "$KERNEL=linux mem=256M -- $APPEND" --module "$INITRD=linux:initrd")
    vireo+=("$t")
    part+=("$(awk -v a="$first" -v b="$start" 'BEGIN { printf "%.3f", b - a }')")
    vm_to_init+=("$(awk -v a="$start" -v b="$t" 'BEGIN { printf "%.3f", b - a }')")
    emu_unlock
done
n="$(printf '%s\n' "${native[@]}" | median)"
v="$(printf '%s\n' "${vireo[@]}" | median)"
p="$(printf '%s\n' "${part[@]}" | median)"
g="$(printf '%s\n' "${vm_to_init[@]}" | median)"
echo "native (QEMU -kernel), start to /init:   ${native[*]}  median $n s"
echo "under Vireo, emulator start to /init:    ${vireo[*]}  median $v s"
echo "under Vireo, VM start to /init:          ${vm_to_init[*]}  median $g s"
echo "Vireo's own part (first line to VM start): ${part[*]}  median $p s  (target < 0.2 s)"
awk -v n="$n" -v g="$g" 'BEGIN { printf "ratio (VM start to /init under Vireo / native): %.2f  (target <= 1.3)\n", g / n }'
echo "exit table of the last boot under Vireo:"
grep -E "vireo: vm name=linux (end|exit reason|memory)" /tmp/vireo-bench-linux-last.log || true
