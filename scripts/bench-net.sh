#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Network figures of Vireo in QEMU TCG (AMD SVM emulated), issue 12. No pass/fail on timing.
#
# 1. Native loopback: the Debian guest of scripts/guest-linux.sh (its network image, with
#    iperf3) booted by QEMU itself (-kernel, -smp 1, no NIC) runs an iperf3 TCP server and
#    client over lo for --secs seconds (linux_guest_net=...,iperf=loop).
# 2. VM to VM under Vireo: QEMU -smp 2, two one-vCPU VMs `a` (server) and `b` (client) whose
#    virtio-net NICs are ports of Vireo's switch sw0 (`net=sw0`), iperf3 TCP b -> a for
#    --secs seconds; once per --hogs K, with K CPU-bound shell loops in the receiving VM `a`.
#    Each VM counts its exits (Vireo's statistics hypercall, /sys/hypervisor/vireo/exits) and
#    its virtio-net input interrupts (/proc/interrupts) around the run: printed per megabyte
#    received.
# The emulators run with no host network (-nic none): the traffic stays inside Vireo.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECS=5
HOGS=(0)
TIMEOUT=300

usage() {
    cat <<EOF2
Usage: scripts/bench-net.sh [OPTIONS]

VM-to-VM iperf3 TCP throughput through Vireo's virtual switch (QEMU -smp 2, two VMs) vs the
same kernel's loopback iperf3 in one VM run natively by QEMU, with Vireo's exits and virtio
interrupts per megabyte received; optionally with CPU-bound loops in the receiving VM.

Options:
  --secs N      iperf3 run length in seconds (default $SECS)
  --hogs LIST   comma-separated counts of CPU-bound loops in the receiving VM, one Vireo
                run each (default 0; e.g. 0,1,2)
  --timeout S   limit per emulator run in seconds (default $TIMEOUT)
  -h, --help    this text

Environment: VIREO_EMU_LOCK=FILE holds flock FILE around each emulator run.
EOF2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --secs)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "--secs wants a positive number, not '$2'"
            SECS="$2"; shift ;;
        --hogs)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "--hogs wants e.g. 0,1,2, not '$2'"
            IFS=, read -r -a HOGS <<<"$2"; shift ;;
        --timeout)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout wants seconds, not '$2'"
            TIMEOUT="$2"; shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done

"$VIREO_ROOT/scripts/install-deps.sh" --quiet linux
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"
GUEST="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)"
KERNEL="$(sed -n 's/^kernel=//p' <<<"$GUEST")"
INITRD="$(sed -n 's/^initrd_net=//p' <<<"$GUEST")"
[[ -f "$KERNEL" && -f "$INITRD" ]] || die "guest-linux.sh gave no kernel or network initramfs"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-bench-net.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

BASE="console=ttyS0 panic=-1 linux_guest_compute=1 linux_guest_forks=1 linux_guest_parallel=1 linux_guest_net_secs=$SECS"

# iperf_field LOG VM KEY: KEY= of VM's "linux-guest: net iperf" line (VM "" for a native log).
iperf_field() {
    local prefix=""
    [[ -n "$2" ]] && prefix="\\[$2\\] "
    serial_clean "$1" | sed -n "s/^${prefix}linux-guest: net iperf .*\\b$3=\\([^ ]*\\).*/\\1/p" | head -n 1
}

mbit() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f", b / 1e6 }'; }
per_mb() { awk -v n="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.1f", n / (b / 1e6); else print "n/a" }'; }

echo "bench-net: iperf3 TCP, $SECS s per run, QEMU TCG"

log="$WORK/native.log"
emu_lock
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu qemu64 -m 512 -smp 1 \
    -display none -serial stdio -monitor none -parallel none -no-reboot -nic none \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$BASE linux_guest_net=127.0.0.1/8,iperf=loop" >"$log" 2>&1 || true
emu_unlock
native="$(iperf_field "$log" "" bits_per_second)"
if [[ -z "$native" ]]; then
    note "native run gave no iperf line"
    serial_clean "$log" | grep -a 'linux-guest: net\|panic' >&2 || true
fi
printf '  native loopback (one VM, QEMU -kernel -smp 1): %s Mbit/s\n' "$(mbit "$native")"

for k in "${HOGS[@]}"; do
    log="$WORK/vireo-$k.log"
    emu_lock
    "$VIREO_ROOT/scripts/run-qemu.sh" --headless --accel tcg --timeout "$TIMEOUT" --elf "$ELF" --log "$log" \
        --smp 2 --mem 512 \
        --module "$KERNEL=a mem=160M net=sw0 -- $BASE linux_guest_net=10.0.0.1/24,peer=10.0.0.2,iperf=server,hogs=$k" \
        --module "$INITRD=a:initrd" \
        --module "$KERNEL=b mem=160M net=sw0 -- $BASE linux_guest_net=10.0.0.2/24,peer=10.0.0.1,iperf=client" \
        --module "$INITRD=b:initrd" >/dev/null 2>&1 || note "Vireo run (hogs=$k) ended with an error"
    emu_unlock
    [[ -f "$log" ]] || : >"$log"
    bps="$(iperf_field "$log" a bits_per_second)"
    bytes="$(iperf_field "$log" a bytes)"
    ea="$(iperf_field "$log" a exits)"
    eb="$(iperf_field "$log" b exits)"
    ia="$(iperf_field "$log" a irq)"
    ib="$(iperf_field "$log" b irq)"
    if [[ -z "$bps" ]]; then
        note "Vireo run (hogs=$k) gave no iperf line"
        serial_clean "$log" | grep -a 'linux-guest: net\|vireo: net\|vireo: vm name\|panic' >&2 || true
        continue
    fi
    printf '  Vireo VM to VM, %d hog(s) in the receiver: %s Mbit/s (%s of native); per MB received: exits receiver %s sender %s, rx interrupts receiver %s, sender %s\n' \
        "$k" "$(mbit "$bps")" "$(awk -v a="$bps" -v b="${native:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')" \
        "$(per_mb "$ea" "$bytes")" "$(per_mb "$eb" "$bytes")" "$(per_mb "$ia" "$bytes")" "$(per_mb "$ib" "$bytes")"
    serial_clean "$log" | sed -n 's/^vireo: \(net switch=.*\)/    \1/p'
done
