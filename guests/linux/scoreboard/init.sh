#!/bin/sh
# /init of scripts/scoreboard.sh's guest (build/scoreboard/initramfs.cpio.gz: busybox, this
# script, /lib/modules/vireo.ko and the static programs scorebench and nullprog from this
# folder in /bin). The same image boots natively (QEMU -kernel) and as a VM under Vireo.
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

reps="${sb_reps:-1}"
case "$reps" in '' | *[!0-9]*) reps=1 ;; esac
list="$(echo "${sb_iters:-}" | tr ',' ' ')"
r=1
while [ "$r" -le "$reps" ]; do
    for item in $list; do
        name="${item%%:*}"
        n="${item#*:}"
        echo "score: run rep=$r name=$name"
        scorebench "$name" "$n" || echo "score: failed rep=$r name=$name status=$?"
    done
    r=$((r + 1))
done
echo "score: done"
poweroff -f
while :; do sleep 3600; done
