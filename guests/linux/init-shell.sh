#!/bin/sh
# /init of the interactive Linux guest (initramfs-shell.cpio.gz, made by scripts/guest-linux.sh).
# Gives a root shell on the console (the kernel's console=, e.g. ttyS0) and powers off when
# that shell exits. No `set -e`: PID 1 must never exit (the kernel would panic).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
export PS1='linux-guest:\w# '

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /root
mount -t devpts devpts /dev/pts
hostname linux-guest

# Vireo's statistics in /sys/hypervisor/vireo/ (guests/linux/README.md); the module refuses
# to load, saying why in the kernel log, when not under Vireo with hypercall ABI 0.2.
vireo=""
if [ -r /lib/modules/vireo.ko ] && insmod /lib/modules/vireo.ko 2>/dev/null; then
    vireo=", Vireo statistics in /sys/hypervisor/vireo"
fi

console="$(cat /sys/class/tty/console/active 2>/dev/null)"
echo "linux-guest: shell on ${console:-console}, Linux $(uname -r), $(nproc) CPU(s)$vireo; exit the shell to power off"

# The shell is a child, not exec'd, so that this script is still there to power off when it
# exits. setsid + cttyhack give it a session with the console as controlling terminal, so
# that job control and Ctrl-C work.
if command -v cttyhack >/dev/null 2>&1; then
    setsid cttyhack sh
else
    sh
fi

echo "linux-guest: shell exited, powering off"
poweroff -f
while :; do sleep 3600; done
