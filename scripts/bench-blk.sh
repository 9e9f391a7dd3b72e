#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# virtio-blk throughput: sequential reads and writes of a few MiB on /dev/vda, by the Debian
# guest (busybox dd, 1 MiB blocks, O_DIRECT so that the page cache does not answer), under
# Vireo (its virtio-blk on a `linux:disk` module, the image in Vireo's RAM) against the same
# kernel and initramfs booted directly by the same QEMU with the image as QEMU's own virtio
# disk (`-drive file=IMG,if=virtio,format=raw`). The guest's /init runs the bench instead of
# its workload when the kernel command line has linux_guest_disk_bench=MIB
# (guests/linux/init-headless.sh), timing each dd with /proc/uptime (10 ms steps) and, under
# Vireo, counting the VM's exits around it (/sys/hypervisor/vireo/exits).
#
# Printed: MiB/s per side and operation (median over the runs), the ratio Vireo/native, and
# Vireo's exits per MiB. No pass/fail: QEMU TCG emulates both the CPU and, natively, the
# disk, so the figures say how the two paths compare on this emulator, not on hardware.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
MIB=64
usage() {
    cat <<EOF
Usage: scripts/bench-blk.sh [--runs N] [--mib M]

QEMU TCG SVM only (the native side boots the kernel with QEMU's -kernel). Each run boots
natively once and under Vireo once; the disk is a scratch image of M MiB of zeros
(default $MIB), overwritten by the write pass.
Environment: VIREO_EMU_LOCK=FILE runs each emulator boot under flock FILE.
EOF
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --runs) need_arg "$1" "$#"; RUNS="$2"; shift ;;
        --mib) need_arg "$1" "$#"; MIB="$2"; shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || usage_error "--runs wants a positive number"
[[ "$MIB" =~ ^[1-9][0-9]*$ && "$MIB" -le 128 ]] || usage_error "--mib wants 1..128"

"$VIREO_ROOT/scripts/install-deps.sh" --quiet all
out="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)"
KERNEL="$(sed -n 's/^kernel=//p' <<<"$out")"
INITRD="$(sed -n 's/^initrd_headless=//p' <<<"$out")"
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"
APPEND="console=ttyS0 panic=-1 linux_guest_disk_bench=$MIB"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-bench-blk.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
IMG="$WORK/disk.img"
LOG="$WORK/serial.log"

# boot SIDE: one boot on a fresh image; prints "READ_MS WRITE_MS READ_EXITS WRITE_EXITS".
boot() {
    truncate -s 0 "$IMG"
    truncate -s "${MIB}M" "$IMG"
    emu_lock
    if [[ "$1" == native ]]; then
        timeout 300 qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt -m 512 -display none -serial stdio \
            -no-reboot -nic none -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" \
            -drive "file=$IMG,if=virtio,format=raw" </dev/null >"$LOG" 2>&1 || true
    else
        timeout 300 "$VIREO_ROOT/scripts/run-qemu.sh" --headless --timeout 280 --mem 768 --elf "$ELF" \
            --module "$KERNEL=linux mem=256M -- $APPEND" --module "$INITRD=linux:initrd" \
            --module "$IMG=linux:disk" </dev/null >"$LOG" 2>&1 || true
    fi
    emu_unlock
    tr -d '\r' <"$LOG" | awk '
        /linux-guest: disk_bench op=/ {
            for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            ms[f["op"]] = f["ms"]; ex[f["op"]] = f["exits"]
        }
        END {
            if (!("read" in ms) || !("write" in ms)) exit 1
            print ms["read"], ms["write"], ex["read"], ex["write"]
        }' || {
        tail -n 30 "$LOG" >&2
        die "$1 boot: no disk_bench lines (log above)"
    }
}

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
mibs() { awk -v m="$MIB" -v t="$1" 'BEGIN { if (t > 0) printf "%.1f", m * 1000 / t; else print "inf" }'; }

n_r=() n_w=() v_r=() v_w=() x_r=() x_w=()
for run in $(seq "$RUNS"); do
    read -r r w _ _ < <(boot native)
    n_r+=("$r") n_w+=("$w")
    read -r r w er ew < <(boot vireo)
    v_r+=("$r") v_w+=("$w") x_r+=("$er") x_w+=("$ew")
    note "run $run: native read ${n_r[-1]} ms write ${n_w[-1]} ms; vireo read $r ms write $w ms (exits $er, $ew)"
done
nr="$(printf '%s\n' "${n_r[@]}" | median)"
nw="$(printf '%s\n' "${n_w[@]}" | median)"
vr="$(printf '%s\n' "${v_r[@]}" | median)"
vw="$(printf '%s\n' "${v_w[@]}" | median)"
xr="$(printf '%s\n' "${x_r[@]}" | median)"
xw="$(printf '%s\n' "${x_w[@]}" | median)"
echo "virtio-blk sequential dd, $MIB MiB, bs=1M, O_DIRECT, QEMU TCG SVM, median of $RUNS run(s):"
printf '%-6s %14s %14s %8s %16s\n' op native_MiB/s vireo_MiB/s ratio vireo_exits/MiB
for op in read write; do
    if [[ "$op" == read ]]; then n="$nr" v="$vr" x="$xr"; else n="$nw" v="$vw" x="$xw"; fi
    awk -v op="$op" -v n="$n" -v v="$v" -v x="$x" -v m="$MIB" -v ns="$(mibs "$n")" -v vs="$(mibs "$v")" \
        'BEGIN { printf "%-6s %14s %14s %8.2f %16.1f\n", op, ns, vs, (v > 0 ? n / v : 0), x / m }'
done
echo "(ratio: Vireo's throughput over native; times from /proc/uptime, 10 ms steps)"
