#!/bin/sh
# /init of scripts/bench-pv.sh's guest (build/bench-pv/initramfs.cpio.gz: busybox, this script
# and the static programs clockbench, timerbench and lockbench from this folder in /bin).
# The phases run in this order, each only when its key on the kernel command line asks for it
# (the kernel hands unknown key=value parameters to init as environment variables):
#   bench_pv_clock=CALLS     clockbench CALLS
#   bench_pv_idle=SECONDS    sleep SECONDS (the guest idles: only its timer ticks)
#   bench_pv_timer=SECONDS   timerbench SECONDS bench_pv_timer_threads (default 2)
#                            bench_pv_timer_us (default 200)
#   bench_pv_lock=SECONDS    lockbench SECONDS bench_pv_lock_threads (default 4)
#                            bench_pv_lock_mode (mmap or futex, default mmap)
#                            bench_pv_lock_pages (default 4)
#                            bench_pv_lock_rounds (default 1): that many runs, each
#                            followed, with bench_pv_lock_control=THREADS, by a control run
#                            of THREADS threads pinned to CPUs 0..THREADS-1
# Every line for the host starts with "bench-pv: "; each phase is framed by "bench-pv: mark
# phase=NAME begin|end uptime=S" lines, then "bench-pv: done" and power off. No `set -e`:
# PID 1 must never exit (the kernel would panic), so every step carries on.
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# num VALUE DEFAULT: VALUE if it is a plain number (digits, one optional dot), else DEFAULT.
num() {
    case "$1" in
        '' | *[!0-9.]* | *.*.* | .) echo "$2" ;;
        *) echo "$1" ;;
    esac
}

mark() {
    read -r m_up _ </proc/uptime || m_up=0
    echo "bench-pv: mark phase=$1 $2 uptime=$m_up"
}

cs=unknown
read -r cs </sys/devices/system/clocksource/clocksource0/current_clocksource
echo "bench-pv: start cpus=$(nproc) clocksource=$cs kernel=$(uname -r)"

n="$(num "${bench_pv_clock:-}" 0)"
if [ "$n" != 0 ]; then
    mark clock begin
    clockbench "$n"
    mark clock end
fi

n="$(num "${bench_pv_idle:-}" 0)"
if [ "$n" != 0 ]; then
    mark idle begin
    sleep "$n"
    mark idle end
fi

n="$(num "${bench_pv_timer:-}" 0)"
if [ "$n" != 0 ]; then
    mark timer begin
    timerbench "$n" "$(num "${bench_pv_timer_threads:-}" 2)" "$(num "${bench_pv_timer_us:-}" 200)"
    mark timer end
fi

n="$(num "${bench_pv_lock:-}" 0)"
if [ "$n" != 0 ]; then
    l_rounds="$(num "${bench_pv_lock_rounds:-}" 1)"
    l_ctl="$(num "${bench_pv_lock_control:-}" 0)"
    l_mode="${bench_pv_lock_mode:-mmap}"
    l_pages="$(num "${bench_pv_lock_pages:-}" 4)"
    l_r=1
    while [ "$l_r" -le "$l_rounds" ]; do
        mark lock begin
        lockbench "$n" "$(num "${bench_pv_lock_threads:-}" 4)" "$l_mode" "$l_pages" 0
        mark lock end
        if [ "$l_ctl" != 0 ]; then
            mark lock-control begin
            lockbench "$n" "$l_ctl" "$l_mode" "$l_pages" 1
            mark lock-control end
        fi
        l_r=$((l_r + 1))
    done
fi

# Interrupts taken, summed over the CPUs: LOC local timer, RES rescheduling, CAL function
# call, TLB shootdowns.
echo "bench-pv: interrupts $(awk 'NR == 1 { n = NF; next }
    $1 == "LOC:" || $1 == "RES:" || $1 == "CAL:" || $1 == "TLB:" {
        s = 0
        for (i = 2; i <= n + 1; i++) s += $i
        printf "%s=%d ", substr($1, 1, 3), s
    }' /proc/interrupts)"
read -r cs </sys/devices/system/clocksource/clocksource0/current_clocksource
echo "bench-pv: done clocksource=$cs"
poweroff -f
while :; do sleep 3600; done
