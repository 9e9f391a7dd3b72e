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

t_init="$(up)"
echo "linux-guest: init_uptime $t_init"
echo "linux-guest: uname $(uname -a)"
echo "linux-guest: cpus $(nproc)"
echo "linux-guest: mem_kb $(awk '/^MemTotal:/ { print $2; exit }' /proc/meminfo)"
echo "linux-guest: flags $(awk '/^flags[ \t]*:/ { sub(/^flags[ \t]*:[ \t]*/, ""); print; exit }' /proc/cpuinfo)"
echo "linux-guest: clocksource $(first_line /sys/devices/system/clocksource/clocksource0/current_clocksource)"

# The workload: a compute loop in shell arithmetic (user mode only, no system calls), then a
# fork+exec loop (/bin/true is a link to busybox: each round forks, execs a static binary and
# waits for it). Sizes: 1..200000 and 200 rounds, or what the kernel command line says with
# linux_guest_compute=N and linux_guest_forks=N (the kernel hands such unknown key=value
# parameters to init as environment variables).
compute_n=200000
fork_n=200
case "${linux_guest_compute:-}" in '' | *[!0-9]*) ;; *) compute_n=$linux_guest_compute ;; esac
case "${linux_guest_forks:-}" in '' | *[!0-9]*) ;; *) fork_n=$linux_guest_forks ;; esac

t0="$(up)"
i=1
sum=0
while [ "$i" -le "$compute_n" ]; do
    sum=$((sum + i))
    i=$((i + 1))
done
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
echo "linux-guest: workload_ms $(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }')"
echo "linux-guest: compute_ms $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }')"
echo "linux-guest: fork_ms $(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }')"
# Again at the end: early in boot it can still be tsc-early, or the kernel may have switched
# since (e.g. its watchdog found the TSC unstable).
echo "linux-guest: clocksource_end $(first_line /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "linux-guest: done"

# -f: straight to the reboot(2) system call, no init to ask. The kernel powers off through
# ACPI (S5) where it has an ACPI FADT; without one it halts the CPUs instead.
poweroff -f
# Not reached unless the system call failed; sleeping keeps PID 1 from exiting (a panic).
while :; do sleep 3600; done
