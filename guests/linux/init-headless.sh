#!/bin/sh
# /init of the headless Linux guest (initramfs-headless.cpio.gz, made by scripts/guest-linux.sh).
# Prints what the guest sees, runs a small workload, then powers off. Every result line starts
# with "linux-guest: " so that tests can grep the serial log for it. No `set -e`: PID 1 must
# never exit (the kernel would panic), so every step carries on and the script always ends in
# poweroff.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# up: seconds since boot from /proc/uptime (10 ms steps); `read` is a shell builtin, so taking
# the time forks nothing.
up() {
    read -r up_s _ </proc/uptime || up_s=0
    echo "$up_s"
}

# first_line FILE: the first line of FILE, or "unknown" if it cannot be read.
first_line() {
    line=unknown
    [ -r "$1" ] && read -r line <"$1"
    echo "${line:-unknown}"
}

# Benchmark mode (scripts/bench-smp.sh), only with linux_guest_bench=scaling on the kernel
# command line: the compute loop of the workload below (linux_guest_bench_n iterations, default
# 300000) once alone, then two copies at once, linux_guest_bench_reps times (default 3); one
# "linux-guest: bench scaling rep=R n=N cpus=C t1_ms=T1 t2_ms=T2" line per round (/proc/uptime:
# 10 ms steps; "bench mark" lines before and after each phase), then "linux-guest: bench done"
# and power off. The default path is not affected.
if [ "${linux_guest_bench:-}" = scaling ]; then
    spin() {
        s_i=1
        s_sum=0
        while [ "$s_i" -le "$1" ]; do
            s_sum=$((s_sum + s_i))
            s_i=$((s_i + 1))
        done
    }
    ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }'; }
    b_n=300000
    b_reps=3
    case "${linux_guest_bench_n:-}" in '' | *[!0-9]*) ;; *) b_n=$linux_guest_bench_n ;; esac
    case "${linux_guest_bench_reps:-}" in '' | *[!0-9]*) ;; *) b_reps=$linux_guest_bench_reps ;; esac
    echo "linux-guest: bench start cpus $(nproc) clocksource $(first_line /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    b_r=1
    while [ "$b_r" -le "$b_reps" ]; do
        # The mark lines let the host time the phases too, by when they reach the console.
        echo "linux-guest: bench mark round=$b_r phase=alone"
        b_t0="$(up)"
        spin "$b_n"
        b_t1="$(up)"
        echo "linux-guest: bench mark round=$b_r phase=pair"
        spin "$b_n" &
        spin "$b_n" &
        wait
        b_t2="$(up)"
        echo "linux-guest: bench mark round=$b_r phase=end"
        echo "linux-guest: bench scaling rep=$b_r n=$b_n cpus=$(nproc) t1_ms=$(ms "$b_t0" "$b_t1") t2_ms=$(ms "$b_t1" "$b_t2")"
        b_r=$((b_r + 1))
    done
    echo "linux-guest: bench done"
    poweroff -f
    while :; do sleep 3600; done
fi

# The TSC first (scripts/bench-linux-boot.sh times the boot to here in guest time with it),
# then the uptime line the tests and the wall-clock timing wait for.
[ -x /bin/perfprobe ] && echo "linux-guest: init_tsc $(/bin/perfprobe tsc)"
t_init="$(up)"
echo "linux-guest: init_uptime $t_init"
echo "linux-guest: uname $(uname -a)"
cpus="$(nproc)"
echo "linux-guest: cpus $cpus"
echo "linux-guest: cpuinfo_processors $(awk '/^processor[ \t]*:/ { n++ } END { print n + 0 }' /proc/cpuinfo)"
echo "linux-guest: mem_kb $(awk '/^MemTotal:/ { print $2; exit }' /proc/meminfo)"
echo "linux-guest: flags $(awk '/^flags[ \t]*:/ { sub(/^flags[ \t]*:[ \t]*/, ""); print; exit }' /proc/cpuinfo)"
echo "linux-guest: clocksource $(first_line /sys/devices/system/clocksource/clocksource0/current_clocksource)"

# The PCI functions Linux enumerated, an lspci equivalent from /sys/bus/pci: one
# "linux-guest: pci BDF VENDOR DEVICE CLASS" line each (e.g. "0000:00:00.0 0x8086 0x1237
# 0x060000"), then "linux-guest: pci_devices N". Shell builtins only: no applet needed.
pci_n=0
for d in /sys/bus/pci/devices/*; do
    [ -r "$d/vendor" ] || continue
    echo "linux-guest: pci ${d##*/} $(first_line "$d/vendor") $(first_line "$d/device") $(first_line "$d/class")"
    pci_n=$((pci_n + 1))
done
echo "linux-guest: pci_devices $pci_n"

# virtio over PCI (only when a virtio function, vendor 0x1af4, is on the bus: the default VMs
# see no change). The Debian kernel has the virtio drivers as modules; the image carries them
# in /lib/modules/virtio/ (scripts/guest-linux.sh), loaded here in dependency order. Then one
# "linux-guest: virtio BDF VENDOR DEVICE DRIVER" line per virtio function, the virtio rows of
# /proc/interrupts ("linux-guest: virtio_irq ..."), and with a virtio-console a line written
# to /dev/hvc0 only, which reaches the host through the virtqueue, not the UART.
virtio_pci_n=0
for d in /sys/bus/pci/devices/*; do
    [ "$(first_line "$d/vendor")" = 0x1af4 ] && virtio_pci_n=$((virtio_pci_n + 1))
done
if [ "$virtio_pci_n" -gt 0 ]; then
    # The modules' kernel messages stay off the console (see vireo.ko below).
    virtio_console_level=7
    read -r virtio_console_level _ </proc/sys/kernel/printk
    echo 1 >/proc/sys/kernel/printk
    loaded=0
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console; do
        insmod "/lib/modules/virtio/$m.ko" 2>/dev/null && loaded=$((loaded + 1))
    done
    echo "$virtio_console_level" >/proc/sys/kernel/printk
    echo "linux-guest: virtio_modules $loaded"
    for d in /sys/bus/pci/devices/*; do
        [ "$(first_line "$d/vendor")" = 0x1af4 ] || continue
        drv=none
        [ -e "$d/driver" ] && drv="$(readlink "$d/driver")" && drv="${drv##*/}"
        echo "linux-guest: virtio ${d##*/} $(first_line "$d/vendor") $(first_line "$d/device") $drv"
    done
    w=0
    while [ ! -c /dev/hvc0 ] && [ "$w" -lt 20 ]; do
        sleep 0.1
        w=$((w + 1))
    done
    if [ -c /dev/hvc0 ]; then
        echo "linux-guest: hvc0 ok" >/dev/hvc0
        # Keyboard input through the virtio console (linux_guest_hvc_read=1): the host types a
        # line once it sees "hvc0 ready" (scripts/run-qemu.sh --type-after); the guest reads it
        # from /dev/hvc0, held open from before the prompt so no byte can come too early.
        if [ "${linux_guest_hvc_read:-}" = 1 ]; then
            exec 3<>/dev/hvc0
            echo "linux-guest: hvc0 ready" >&3
            # shellcheck disable=SC3045 # busybox ash's read has -t
            if read -t 120 -r typed <&3; then
                echo "linux-guest: hvc0 typed $typed"
            else
                echo "linux-guest: hvc0 typed none"
            fi
            exec 3<&-
        fi
    else
        echo "linux-guest: hvc0 absent"
    fi
    awk '/virtio/ { $1 = $1; print "linux-guest: virtio_irq " $0 }' /proc/interrupts
fi

# Vireo's statistics module (guests/linux/vireo-mod): under Vireo (hypercall ABI 0.2 or later)
# it makes /sys/hypervisor/vireo/; anywhere else insmod fails and the module has logged one
# "vireo: absent reason=WORD (...)" line, whose WORD is printed here.
# The kernel messages of the load (two taint notices for an unsigned out-of-tree module, the
# module's own line) stay off the console, in the kernel log only: the kernel writes to the
# console at once, while the lines echoed before may still be draining from the serial
# driver's buffer, so they would land inside a guest line.
VIREO_SYS=/sys/hypervisor/vireo
console_level=7
read -r console_level _ </proc/sys/kernel/printk
echo 1 >/proc/sys/kernel/printk
if [ ! -r /lib/modules/vireo.ko ]; then
    vireo_status="absent reason=no-module-file"
elif insmod /lib/modules/vireo.ko 2>/dev/null; then
    vireo_status="loaded abi=$(first_line "$VIREO_SYS/abi_version") vcpus=$(first_line "$VIREO_SYS/vcpus")"
else
    reason="$(dmesg | awk '/vireo: absent reason=/ { sub(/.*vireo: absent reason=/, ""); r = $1 } END { print r }')"
    vireo_status="absent reason=${reason:-insmod-failed}"
fi
echo "$console_level" >/proc/sys/kernel/printk
echo "linux-guest: vireo_module $vireo_status"

# Output cost, only with linux_guest_virtio_bench=N on the kernel command line, a virtio-console
# and vireo.ko loaded: N lines of 80 bytes written to /dev/hvc0 (one virtqueue notification per
# write) and then to /dev/ttyS0 (the UART: an exit per byte and then some), with the VM's exits
# (/sys/hypervisor/vireo/exits, all kinds) counted around each:
# "linux-guest: virtio_bench dev=DEV lines=N exits=E".
case "${linux_guest_virtio_bench:-}" in '' | *[!0-9]*) ;; *)
    if [ -c /dev/hvc0 ] && [ -r "$VIREO_SYS/exits" ]; then
        total_exits() {
            te=0
            while read -r _ count _; do te=$((te + count)); done <"$VIREO_SYS/exits"
            echo "$te"
        }
        for dev in hvc0 ttyS0; do
            e0="$(total_exits)"
            i=0
            while [ "$i" -lt "$linux_guest_virtio_bench" ]; do
                echo "linux-guest: virtio_bench_line 0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH"
                i=$((i + 1))
            done >"/dev/$dev"
            e1="$(total_exits)"
            echo "linux-guest: virtio_bench dev=$dev lines=$linux_guest_virtio_bench exits=$((e1 - e0))"
        done
    fi
    ;;
esac

# virtio-blk (guests/linux: only with a virtio function on the bus, and a disk behind it):
# virtio_blk.ko is loaded; with /dev/vda, one "linux-guest: disk ..." line per step:
#   disk dev vda sectors N ro 0|1 serial S driver DRIVER   (the PCI function's driver)
#   disk mount ok|failed          mount -t ext4 (-o ro when the device is read-only)
#   disk hello TEXT               /hello.txt
#   disk payload_sha256 HEX       of /payload.bin
#   disk previous TEXT|unknown    /written.txt before this boot writes it (after a guest reset:
#                                 what the previous boot wrote, the disk is kept)
#   disk write ok|refused         /written.txt written and synced (refused on a read-only disk)
#   disk readback ok|bad|skipped  after umount and a fresh mount
#   disk irq ROW                  the request queue's row of /proc/interrupts
# With linux_guest_disk_bench=MIB instead (scripts/bench-blk.sh; it overwrites the disk):
# sequential dd of MIB MiB with O_DIRECT, read then write, each "linux-guest: disk_bench
# op=read|write mib=M ms=T exits=E" (exits: -1 without vireo.ko), then power off.
if [ "$virtio_pci_n" -gt 0 ]; then
    read -r disk_console_level _ </proc/sys/kernel/printk
    echo 1 >/proc/sys/kernel/printk
    insmod /lib/modules/virtio/virtio_blk.ko 2>/dev/null
    w=0
    while [ ! -b /dev/vda ] && [ -d /sys/block/vda ] && [ "$w" -lt 20 ]; do
        sleep 0.1
        w=$((w + 1))
    done
    echo "$disk_console_level" >/proc/sys/kernel/printk
fi
if [ -b /dev/vda ]; then
    disk_exits() {
        de=0
        if [ -r "$VIREO_SYS/exits" ]; then
            while read -r _ count _; do de=$((de + count)); done <"$VIREO_SYS/exits"
        else
            de=-1
        fi
        echo "$de"
    }
    case "${linux_guest_disk_bench:-}" in '' | *[!0-9]*) ;; *)
        for op in read write; do
            e0="$(disk_exits)"
            t0="$(up)"
            if [ "$op" = read ]; then
                dd if=/dev/vda of=/dev/null bs=1M count="$linux_guest_disk_bench" iflag=direct 2>/dev/null
            else
                dd if=/dev/zero of=/dev/vda bs=1M count="$linux_guest_disk_bench" oflag=direct conv=fsync 2>/dev/null
            fi
            t1="$(up)"
            e1="$(disk_exits)"
            [ "$e0" -ge 0 ] && e1=$((e1 - e0))
            echo "linux-guest: disk_bench op=$op mib=$linux_guest_disk_bench ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }') exits=$e1"
        done
        poweroff -f
        while :; do sleep 3600; done
        ;;
    esac
    disk_ro="$(first_line /sys/block/vda/ro)"
    # /sys/block/vda/device is virtioN, whose parent is the PCI function.
    disk_drv=none
    [ -e /sys/block/vda/device/../driver ] && disk_drv="$(readlink /sys/block/vda/device/../driver)" &&
        disk_drv="${disk_drv##*/}"
    echo "linux-guest: disk dev vda sectors $(first_line /sys/block/vda/size) ro $disk_ro serial $(first_line /sys/block/vda/serial) driver $disk_drv"
    mkdir -p /mnt
    disk_opts=rw
    [ "$disk_ro" = 1 ] && disk_opts=ro
    if mount -t ext4 -o "$disk_opts" /dev/vda /mnt; then
        echo "linux-guest: disk mount ok"
        echo "linux-guest: disk hello $(first_line /mnt/hello.txt)"
        disk_sha="$(sha256sum /mnt/payload.bin 2>/dev/null)"
        echo "linux-guest: disk payload_sha256 ${disk_sha%% *}"
        echo "linux-guest: disk previous $(first_line /mnt/written.txt)"
        disk_token="written by boot ${vireo_boot:-1}"
        if { echo "$disk_token" >/mnt/written.txt; } 2>/dev/null && sync; then
            echo "linux-guest: disk write ok"
            umount /mnt
            disk_back=bad
            if mount -t ext4 /dev/vda /mnt && [ "$(first_line /mnt/written.txt)" = "$disk_token" ]; then
                disk_back=ok
            fi
            echo "linux-guest: disk readback $disk_back"
        else
            echo "linux-guest: disk write refused"
            echo "linux-guest: disk readback skipped"
        fi
        umount /mnt
    else
        echo "linux-guest: disk mount failed"
    fi
    # The request queue's interrupt row, once it has carried requests.
    awk '/virtio.*-req/ { $1 = $1; print "linux-guest: disk irq " $0 }' /proc/interrupts
fi
# Virtual network (issue 12), only with linux_guest_net=ADDR/PREFIX[,peer=ADDR]
# [,iperf=server|client|loop][,hogs=K][,wait=S] on the kernel command line and a virtio-net NIC (00:03.0, `net=SWITCH` on the VM
# line): loads virtio_net, brings eth0 up, pings the peer ("linux-guest: net ping peer=P
# sent=N received=M"), and with iperf3 in the image runs it ("linux-guest: net iperf
# role=R bits_per_second=B"); the NIC's interrupt count and the VM's exits around the run
# ("irq=N exits=E" on that line) give the benchmark's per-megabyte figures. iperf=loop: server
# and client in this VM over lo (the native baseline, no NIC needed); hogs=K: K CPU-bound
# shell loops run during the iperf3 run (scripts/bench-net.sh).
if [ -n "${linux_guest_net:-}" ]; then
    n_addr="${linux_guest_net%%,*}"
    n_peer=""
    n_iperf=""
    n_wait=30
    n_hogs=0
    n_rest="${linux_guest_net#"$n_addr"}"
    old_ifs="$IFS"
    IFS=,
    for kv in $n_rest; do
        case "$kv" in
            peer=*) n_peer="${kv#peer=}" ;;
            iperf=*) n_iperf="${kv#iperf=}" ;;
            wait=*) n_wait="${kv#wait=}" ;;
            hogs=*) n_hogs="${kv#hogs=}" ;;
        esac
    done
    IFS="$old_ifs"
    n_level=7
    read -r n_level _ </proc/sys/kernel/printk
    echo 1 >/proc/sys/kernel/printk
    n_mods=0
    for m in failover net_failover virtio_net; do
        insmod "/lib/modules/virtio/$m.ko" 2>/dev/null && n_mods=$((n_mods + 1))
    done
    echo "$n_level" >/proc/sys/kernel/printk
    w=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$w" -lt 50 ]; do
        sleep 0.1
        w=$((w + 1))
    done
    ip link set lo up
    if ip addr add "$n_addr" dev eth0 && ip link set eth0 up; then
        echo "linux-guest: net up modules=$n_mods addr=$n_addr mac=$(first_line /sys/class/net/eth0/address)"
    else
        echo "linux-guest: net down modules=$n_mods"
    fi
    n_exits() {
        te=0
        if [ -r "$VIREO_SYS/exits" ]; then
            while read -r _ count _; do te=$((te + count)); done <"$VIREO_SYS/exits"
        fi
        echo "$te"
    }
    n_irq() {
        awk '/virtio.*input/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i } END { print s + 0 }' /proc/interrupts
    }
    if [ -n "$n_peer" ]; then
        # The peer boots at its own pace: ping until it answers (up to n_wait seconds), then
        # count 5 more.
        w=0
        while ! ping -c 1 -W 1 "$n_peer" >/dev/null 2>&1 && [ "$w" -lt "$n_wait" ]; do
            w=$((w + 1))
        done
        n_out="$(ping -c 5 -i 0.2 -W 2 "$n_peer" 2>&1)"
        n_rx="$(echo "$n_out" | awk '/packets transmitted/ { print $4 }')"
        echo "linux-guest: net ping peer=$n_peer sent=5 received=${n_rx:-0}"
    fi
    if [ -n "$n_iperf" ] && command -v iperf3 >/dev/null 2>&1; then
        n_pids=""
        h=0
        case "$n_hogs" in '' | *[!0-9]*) n_hogs=0 ;; esac
        while [ "$h" -lt "$n_hogs" ]; do
            sh -c 'while :; do :; done' &
            n_pids="$n_pids $!"
            h=$((h + 1))
        done
        e0="$(n_exits)"
        i0="$(n_irq)"
        n_secs="${linux_guest_net_secs:-3}"
        case "$n_iperf" in
            server) n_res="$(iperf3 -s -1 -J 2>&1)" ;;
            client)
                # The server may not listen yet: retry a refused connection for a while.
                t=0
                while :; do
                    n_res="$(iperf3 -c "$n_peer" -t "$n_secs" -J 2>&1)"
                    case "$n_res" in *'"sum_received"'*) break ;; esac
                    t=$((t + 1))
                    [ "$t" -lt 20 ] || break
                    sleep 1
                done
                ;;
            loop)
                iperf3 -s -1 >/dev/null 2>&1 &
                sleep 1
                n_res="$(iperf3 -c 127.0.0.1 -t "$n_secs" -J 2>&1)"
                ;;
            *) n_res="" ;;
        esac
        e1="$(n_exits)"
        i1="$(n_irq)"
        for p in $n_pids; do kill "$p" 2>/dev/null; done
        bps="$(echo "$n_res" | awk '/"sum_received"/ { r = 1 } r && /"bits_per_second"/ { gsub(/[^0-9.e+]/, "", $2); print $2; exit }')"
        bytes="$(echo "$n_res" | awk '/"sum_received"/ { r = 1 } r && /"bytes"/ { gsub(/[^0-9]/, "", $2); print $2; exit }')"
        echo "linux-guest: net iperf role=$n_iperf bits_per_second=${bps:-0} bytes=${bytes:-0} irq=$((i1 - i0)) exits=$((e1 - e0))"
    elif [ -n "$n_iperf" ]; then
        echo "linux-guest: net iperf absent"
    fi
    if [ -n "$n_peer" ] && [ -z "$n_iperf" ]; then
        # Stay reachable a while for the peer's pings.
        sleep "${linux_guest_net_linger:-3}"
    fi
fi

# Restart test: with linux_guest_reboot=1 the first boot resets the machine; Vireo builds the
# VM again and adds vireo_boot=N (N >= 2) to the kernel command line of later boots.
echo "linux-guest: boot ${vireo_boot:-1}"
if [ "${linux_guest_reboot:-}" = 1 ] && [ -z "${vireo_boot:-}" ]; then
    echo "linux-guest: rebooting"
    reboot -f
    while :; do sleep 3600; done
fi

# ms_between A B: milliseconds from uptime A to uptime B.
ms_between() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }'
}

# sum_to N: sets sum to 1 + 2 + ... + N, in shell arithmetic (user mode only, no system calls).
sum_to() {
    i=1
    sum=0
    while [ "$i" -le "$1" ]; do
        sum=$((sum + i))
        i=$((i + 1))
    done
}

# The workload: a compute loop in shell arithmetic, then a fork+exec loop (/bin/true is a link
# to busybox: each round forks, execs a static binary and waits for it), then, with more than
# one CPU, the parallel workload below. Sizes: 1..200000, 200 rounds and 1..50000 per CPU, or
# what the kernel command line says with linux_guest_compute=N, linux_guest_forks=N and
# linux_guest_parallel=N (the kernel hands such unknown key=value parameters to init as
# environment variables).
compute_n=200000
fork_n=200
parallel_n=50000
case "${linux_guest_compute:-}" in '' | *[!0-9]*) ;; *) compute_n=$linux_guest_compute ;; esac
case "${linux_guest_forks:-}" in '' | *[!0-9]*) ;; *) fork_n=$linux_guest_forks ;; esac
case "${linux_guest_parallel:-}" in '' | *[!0-9]*) ;; *) parallel_n=$linux_guest_parallel ;; esac

t0="$(up)"
sum_to "$compute_n"
t1="$(up)"
n=0
forks=0
while [ "$n" -lt "$fork_n" ]; do
    if /bin/true; then
        forks=$((forks + 1))
    fi
    n=$((n + 1))
done
t2="$(up)"

echo "linux-guest: compute $sum fork $forks"
echo "linux-guest: workload_ms $(ms_between "$t0" "$t2")"
echo "linux-guest: compute_ms $(ms_between "$t0" "$t1")"
echo "linux-guest: fork_ms $(ms_between "$t1" "$t2")"

# The virtual PMU, only with linux_guest_perf=MS on the kernel command line: /bin/perfprobe
# (guests/linux/perfprobe.c) counts cycles, Vireo's exit events (r0056) and CPUID exits
# (r0156) over a busy loop of MS ms with linux_guest_perf_cpuids=N cpuid instructions (default
# 1000), next to Vireo's own count through vireo.ko, then samples cycles every millisecond
# over another MS ms: "linux-guest: perf stat ..." and "linux-guest: perf record ..." lines
# (or "linux-guest: perf unavailable errno=E" without a PMU); then counts cycles and exits of
# a shell counting to linux_guest_perf_run=N (default 5000), as `perf stat CMD` would:
# "linux-guest: perf run cycles= exits= tsc= elapsed_ns= running_ns= status=".
case "${linux_guest_perf:-}" in
    '' | *[!0-9]*) ;;
    *)
        perf_cpuids=1000
        case "${linux_guest_perf_cpuids:-}" in '' | *[!0-9]*) ;; *) perf_cpuids=$linux_guest_perf_cpuids ;; esac
        if [ -x /bin/perfprobe ]; then
            /bin/perfprobe "$linux_guest_perf" "$perf_cpuids"
            # perf stat of a command: a count to linux_guest_perf_run (default 5000) in a new shell.
            perf_run_n=5000
            case "${linux_guest_perf_run:-}" in '' | *[!0-9]*) ;; *) perf_run_n=$linux_guest_perf_run ;; esac
            # shellcheck disable=SC2016 # the inner shell expands them
            /bin/perfprobe run /bin/sh -c 'i=0; while [ "$i" -lt "$1" ]; do i=$((i + 1)); done' sh "$perf_run_n"
        else
            echo "linux-guest: perf unavailable errno=no-program"
        fi
        ;;
esac

# The parallel workload: one background subshell per CPU, each computing 1 + ... + parallel_n
# into its own file, all at once; then every result is checked. The scheduler spreads them
# over the CPUs (rescheduling IPIs to wake idle ones); their forks and exits while the others
# run, on CPUs they may have been moved between, make the kernel flush TLBs on other CPUs
# (TLB shootdowns, through function-call IPIs).
if [ "$cpus" -gt 1 ] 2>/dev/null; then
    t3="$(up)"
    c=0
    while [ "$c" -lt "$cpus" ]; do
        (
            sum_to "$parallel_n"
            echo "$sum" >"/tmp/parallel.$c"
        ) &
        c=$((c + 1))
    done
    wait
    t4="$(up)"
    expected=$((parallel_n * (parallel_n + 1) / 2))
    ok=0
    c=0
    while [ "$c" -lt "$cpus" ]; do
        r=none
        [ -r "/tmp/parallel.$c" ] && read -r r <"/tmp/parallel.$c"
        [ "$r" = "$expected" ] && ok=$((ok + 1))
        c=$((c + 1))
    done
    echo "linux-guest: parallel cpus=$cpus ok=$ok ms=$(ms_between "$t3" "$t4")"
fi

# Inter-processor interrupts taken so far, summed over the CPUs (/proc/interrupts: a header of
# CPU0 CPU1 ..., then one row per source with one count per CPU): RES rescheduling,
# CAL function call, TLB shootdowns.
echo "linux-guest: ipi $(awk 'NR == 1 { n = NF; next }
    $1 == "RES:" || $1 == "CAL:" || $1 == "TLB:" {
        s = 0
        for (i = 2; i <= n + 1; i++) s += $i
        v[substr($1, 1, 3)] = s
    }
    END { printf "RES=%d CAL=%d TLB=%d", v["RES"], v["CAL"], v["TLB"] }' /proc/interrupts)"
# Again at the end: early in boot it can still be tsc-early, or the kernel may have switched
# since (e.g. its watchdog found the TSC unstable).
echo "linux-guest: clocksource_end $(first_line /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "linux-guest: done"

# The very last lines: the VM's exits so far as Vireo counts them (one STATS hypercall: the
# file is read once, through one open), one line per kind with a non-zero count, and its
# steal time. The guest still exits between this read and the power-off, so Vireo's own
# end-of-VM table counts a little more.
if [ -r "$VIREO_SYS/exits" ]; then
    while read -r kind count _; do
        echo "linux-guest: vireo_exits $kind=$count"
    done <"$VIREO_SYS/exits"
    echo "linux-guest: vireo_steal_ns $(first_line "$VIREO_SYS/steal_ns")"
fi

# -f: straight to the reboot(2) system call, no init to ask. The kernel powers off through
# ACPI (S5) where it has an ACPI FADT; without one it halts the CPUs instead.
poweroff -f
# Not reached unless the system call failed; sleeping keeps PID 1 from exiting (a panic).
while :; do sleep 3600; done
