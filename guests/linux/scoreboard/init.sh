#!/bin/sh
# /init of scripts/scoreboard.sh's guest (build/scoreboard/initramfs.cpio.gz: busybox, this
# script, /lib/modules/vireo.ko, the static programs scorebench and nullprog from this
# folder in /bin, and Debian's sysbench, perf, stress-ng and dbench with the shared libraries
# they link, dbench's loadfile in /usr/share/dbench/client.txt). The same image boots natively
# (QEMU -kernel) and as a VM under Vireo.
# The kernel command line says what to run (the kernel hands unknown key=value parameters to
# init as environment variables):
#   sb_iters=NAME:N,NAME:N,...   the benchmarks, in this order, with their iterations (for
#                                dbench, which runs for a time, its seconds)
#   sb_reps=R                    repetitions (default 1): R rounds over the whole list
# It loads vireo.ko (under Vireo it gives /sys/hypervisor/vireo; natively insmod fails and
# scorebench then prints no exit figures), then prints "score: start ...", the lines of
# each scorebench run prefixed by nothing else ("score: name=..." and, under Vireo,
# "score: exits name=..."), each run preceded by "score: run rep=R name=NAME", then
# "score: done", waits for the console to drain and powers off. No `set -e`: PID 1 must
# never exit (the kernel would panic).
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

# exits_since_mark: " KIND=COUNT ..." from vireo.ko (empty natively).
exits_since_mark() {
    ex=""
    if [ -r "$V/exits_since_mark" ]; then
        while read -r k c _; do ex="$ex $k=$c"; done <"$V/exits_since_mark"
    fi
    echo "$ex"
}

# third_party NAME N SECONDS OUTPUT STATUS: the score lines of a third-party benchmark that
# did N operations in SECONDS (its own figure), with the exits from a mark just before it
# started to a read just after it ended (its start-up is counted in the exits, not in the time).
third_party() {
    tp_ex="$(exits_since_mark)"
    if [ "$5" != 0 ] || [ -z "$3" ]; then
        echo "$4" | tail -n 5
        return 1
    fi
    awk -v t="$3" -v n="$2" -v name="$1" 'BEGIN { printf "score: name=%s iterations=%d ns_per_op=%.2f\n", name, n, t * 1e9 / n }'
    [ -z "$tp_ex" ] || awk -v t="$3" -v ex="$tp_ex" -v name="$1" 'BEGIN { printf "score: exits name=%s elapsed_ns=%.0f%s\n", name, t * 1e9, ex }'
}

mark() {
    [ -w "$V/mark" ] && echo 1 >"$V/mark"
}

# sysbench_threads EVENTS: `sysbench threads` (2 threads, 100 sched_yield() and 2 mutex
# lock/unlock pairs per event); time from sysbench's own "total time".
sysbench_threads() {
    mark
    out="$(sysbench threads --threads=2 --thread-yields=100 --thread-locks=2 --events="$1" --time=0 run 2>&1)"
    st=$?
    t="$(echo "$out" | awk '/total time:/ { sub(/s$/, "", $3); print $3 }')"
    third_party sysbench-threads "$1" "$t" "$out" "$st"
}

# perf_bench NAME N ARGS...: `perf bench ARGS` doing N operations; time from perf's own
# "usecs/op" (6 decimals) where it prints one, else its "Total time: T [sec]".
perf_bench() {
    name="$1"
    n="$2"
    shift 2
    mark
    out="$(perf bench "$@" 2>&1)"
    st=$?
    t="$(echo "$out" | awk -v n="$n" '/usecs\/op/ { u = $1 } /Total time:/ { tt = $3 }
        END { if (u != "") printf "%.9f\n", u * n / 1e6; else if (tt != "") print tt }')"
    third_party "$name" "$n" "$t" "$out" "$st"
}

# stress_ng NAME STRESSOR OPS: one instance of a stress-ng stressor doing a fixed OPS bogo
# operations (--STRESSOR-ops; stress-ng's time limit is not used); time from stress-ng's own
# report: its --metrics-brief line "STRESSOR BOGO-OPS REAL USR SYS OPS/S(REAL) OPS/S(USR+SYS)"
# gives the real time with 2 decimals only, so the time is BOGO-OPS / OPS/S(REAL) (the rate
# has 2 decimals, about 7 significant digits here).
stress_ng() {
    mark
    out="$(stress-ng --"$2" 1 --"$2"-ops "$3" --temp-path /tmp --metrics-brief 2>&1)"
    st=$?
    t="$(echo "$out" | awk -v s="$2" '$2 == "metrc:" && $4 == s && $5 ~ /^[0-9]+$/ && $9 > 0 { printf "%.9f\n", $5 / $9 }')"
    third_party "$1" "$3" "$t" "$out" "$st"
}

# uptime_cs: the time since boot in hundredths of a second (/proc/uptime), for the exit rates
# of a run that reports no duration of its own.
uptime_cs() {
    awk '{ printf "%d\n", $1 * 100 + 0.5 }' /proc/uptime
}

# dbench_tmpfs SECONDS: `dbench -t SECONDS 1` (one client, Debian's loadfile client.txt) in a
# fresh tmpfs. dbench has no fixed-work mode: it runs for SECONDS (at least 2: its figure is
# the rate at its last once-a-second report before the time limit, so -t 1 reports 0) and
# prints "Throughput X MB/sec" (bytes the client read and wrote per second). Under -icount that
# window is guest time, so the native and Vireo figures compare; to fit the scoreboard's "time
# per operation, lower is better" the operation is one MB of that I/O: ns_per_op = 1e9 / X,
# and Vireo/native of it is native MB/s over Vireo MB/s. The exits are counted over the whole
# run (start-up and clean-up included) and divided by its duration from /proc/uptime.
dbench_tmpfs() {
    mkdir -p /mnt/dbench
    if ! mount -t tmpfs -o size=128m tmpfs /mnt/dbench; then
        echo "dbench: cannot mount a tmpfs on /mnt/dbench"
        return 1
    fi
    mark
    u0="$(uptime_cs)"
    out="$(dbench -t "$1" -c /usr/share/dbench/client.txt -D /mnt/dbench 1 2>&1)"
    st=$?
    u1="$(uptime_cs)"
    tp_ex="$(exits_since_mark)"
    umount /mnt/dbench
    x="$(echo "$out" | awk '$1 == "Throughput" && $3 == "MB/sec" && $2 > 0 { print $2 }')"
    if [ "$st" != 0 ] || [ -z "$x" ]; then
        echo "$out" | tail -n 5
        return 1
    fi
    awk -v x="$x" -v n="$1" 'BEGIN { printf "score: name=dbench iterations=%d ns_per_op=%.2f\n", n, 1e9 / x }'
    [ -z "$tp_ex" ] || awk -v t="$((u1 - u0))" -v ex="$tp_ex" 'BEGIN { printf "score: exits name=dbench elapsed_ns=%.0f%s\n", t * 1e7, ex }'
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
        case "$name" in
            sysbench-threads) sysbench_threads "$n" ;;
            perf-syscall) perf_bench "$name" "$n" syscall basic --loop "$n" ;;
            perf-pipe) perf_bench "$name" "$n" sched pipe --loop "$n" ;;
            perf-messaging) perf_bench "$name" "$n" sched messaging --group 1 --nr_loops "$n" ;;
            stress-ng-switch) stress_ng "$name" switch "$n" ;;
            dbench) dbench_tmpfs "$n" ;;
            *) scorebench "$name" "$n" ;;
        esac || echo "score: failed rep=$r name=$name status=$?"
    done
    r=$((r + 1))
done
echo "score: done"
# Let the console drain before the power goes: an emulated UART that keeps its baud rate (Bochs)
# still has the last lines in the tty's buffer, and poweroff -f does not wait for them. stty
# applies its settings with TCSADRAIN, which waits until the UART has sent everything.
stty -F /dev/console "$(stty -F /dev/console -g)" 2>/dev/null || sleep 2
poweroff -f
while :; do sleep 3600; done
