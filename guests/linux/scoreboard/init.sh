#!/bin/sh
# /init of scripts/scoreboard.sh's guest (build/scoreboard/initramfs.cpio.gz: busybox, this
# script, /lib/modules/vireo.ko, the static programs scorebench and nullprog from this
# folder in /bin, and Debian's sysbench with the shared libraries it links). The same image boots natively (QEMU -kernel) and as a VM under Vireo.
# The kernel command line says what to run (the kernel hands unknown key=value parameters to
# init as environment variables):
#   sb_iters=NAME:N,NAME:N,...   the benchmarks, in this order, with their iterations
#   sb_reps=R                    repetitions (default 1): R rounds over the whole list
# It loads vireo.ko (under Vireo it gives /sys/hypervisor/vireo; natively insmod fails and
# scorebench then prints no exit figures), then prints "score: start ...", the lines of
# each scorebench run prefixed by nothing else ("score: name=..." and, under Vireo,
# "score: exits name=..."), each run preceded by "score: run rep=R name=NAME", then
# "score: done" and powers off. No `set -e`: PID 1 must never exit (the kernel would panic).
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# The kernel's messages of the module load stay off the console (see init-headless.sh).
read -r level _ </proc/sys/kernel/printk || level=7
echo 1 >/proc/sys/kernel/printk
if insmod /lib/modules/vireo.ko 2>/dev/null; then vireo=loaded; else vireo=absent; fi
echo "$level" >/proc/sys/kernel/printk

cs=unknown
read -r cs </sys/devices/system/clocksource/clocksource0/current_clocksource
echo "score: start cpus=$(nproc) clocksource=$cs vireo_module=$vireo kernel=$(uname -r)"

V=/sys/hypervisor/vireo

# sysbench_threads EVENTS: the third-party benchmark `sysbench threads` (2 threads, 100
# sched_yield() and 2 mutex lock/unlock pairs per event), as a score line: ns per event from
# sysbench's own "total time"; the exits from a mark just before sysbench starts to a read
# just after it ends (its start-up is counted in the exits, not in the time).
sysbench_threads() {
    [ -w "$V/mark" ] && echo 1 >"$V/mark"
    sb_out="$(sysbench threads --threads=2 --thread-yields=100 --thread-locks=2 --events="$1" --time=0 run 2>&1)"
    sb_status=$?
    sb_ex=""
    if [ -r "$V/exits_since_mark" ]; then
        while read -r sb_k sb_c _; do sb_ex="$sb_ex $sb_k=$sb_c"; done <"$V/exits_since_mark"
    fi
    sb_t="$(echo "$sb_out" | awk '/total time:/ { sub(/s$/, "", $3); print $3 }')"
    if [ "$sb_status" != 0 ] || [ -z "$sb_t" ]; then
        echo "$sb_out" | tail -n 5
        return 1
    fi
    awk -v t="$sb_t" -v n="$1" 'BEGIN { printf "score: name=sysbench-threads iterations=%d ns_per_op=%.2f\n", n, t * 1e9 / n }'
    [ -z "$sb_ex" ] || awk -v t="$sb_t" -v ex="$sb_ex" 'BEGIN { printf "score: exits name=sysbench-threads elapsed_ns=%.0f%s\n", t * 1e9, ex }'
}

reps="${sb_reps:-1}"
case "$reps" in '' | *[!0-9]*) reps=1 ;; esac
list="$(echo "${sb_iters:-}" | tr ',' ' ')"
r=1
while [ "$r" -le "$reps" ]; do
    for item in $list; do
        name="${item%%:*}"
        n="${item#*:}"
        echo "score: run rep=$r name=$name"
        if [ "$name" = sysbench-threads ]; then
            sysbench_threads "$n" || echo "score: failed rep=$r name=$name"
        else
            scorebench "$name" "$n" || echo "score: failed rep=$r name=$name status=$?"
        fi
    done
    r=$((r + 1))
done
echo "score: done"
poweroff -f
while :; do sleep 3600; done
