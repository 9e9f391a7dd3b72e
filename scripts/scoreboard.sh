#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The VMI-style overhead scoreboard: the same micro-benchmarks run natively and in a VM under
# Vireo, in one run, in one of two configurations (--emulator): qemu-svm (default; QEMU TCG
# with AMD SVM emulated, native side QEMU -kernel) or bochs-vmx (Bochs with Intel VMX, cpu
# model corei7_skylake_x; native side a GRUB ISO with a linux/initrd entry); per benchmark the
# native and Vireo figures, the ratio Vireo/native with a 95% confidence interval over the
# repetitions, and the VM's exits per second by reason during that benchmark.
#
# The guest: build/linux/vmlinuz (scripts/guest-linux.sh) with its own initramfs,
# build/scoreboard/initramfs.cpio.gz: busybox, /init = guests/linux/scoreboard/init.sh,
# /lib/modules/vireo.ko (scripts/guest-linux.sh's module) and the static programs scorebench
# and nullprog built from guests/linux/scoreboard/*.c (gcc -O2 -static) each time this script
# runs, and Debian's sysbench, perf (linux-perf), stress-ng and dbench (scripts/install-deps.sh
# bench; dbench's loadfile /usr/share/dbench/client.txt too) with the shared libraries ldd
# names for them, for the third-party benchmarks: sysbench-threads,
# perf-syscall (`perf bench syscall basic`: getppid), perf-pipe (`perf bench sched pipe`: two
# processes ping-pong through pipes) and perf-messaging (`perf bench sched messaging -g 1`:
# 40 processes exchanging messages over sockets, hackbench); and Debian's stress-ng and dbench:
# stress-ng-switch (`stress-ng --switch 1 --switch-ops N`: context switches through a pipe,
# a fixed count of bogo operations, the time from stress-ng's own metrics) and dbench (`dbench
# -t T 1` with its loadfile client.txt on a tmpfs: dbench runs for a time, not a work count,
# and reports a throughput X MB/s; the scoreboard takes 1e9 / X ns per MB as its time per
# operation, so its Vireo/native ratio is native MB/s over Vireo MB/s: under -icount, and on
# Bochs, its T seconds are guest time on both sides, so the two figures compare). The kernel command line
# (sb_iters=NAME:N,... sb_reps=R) says what the guest runs; it is the same on both sides:
# "console=ttyS0 panic=-1 sb_iters=... sb_reps=...".
#
# qemu-svm, both sides: QEMU TCG, -cpu qemu64,+svm,+npt, one emulated CPU. Native: -m 256
# -kernel vmlinuz -initrd initramfs. Vireo: scripts/run-qemu.sh --smp 1 (QEMU -m 512) with
# the VM "linux mem=256M cpus=1 CONFIG" (CONFIG: --config options, default pv=kvm). By default
# QEMU runs with -icount shift=0,sleep=off (single-threaded TCG): guest time counts executed
# instructions (1 ns each), so the load of the host does not move the figures; --wall
# leaves it out (guest time = host time).
#
# bochs-vmx, both sides: Bochs, cpu model corei7_skylake_x, one CPU, the bochsrc of
# scripts/run-bochs.sh (boot/bochsrc.in). Native: scripts/mkiso.sh --linux vmlinuz --initrd
# initramfs (GRUB's linux/initrd; GRUB puts BOOT_IMAGE=/boot/vmlinuz before the command line)
# booted by scripts/run-bochs.sh --cpu vmx --iso ISO --smp 1 --mem 256; the guest's ACPI
# power-off ends Bochs ("ACPI control: soft power off"). Vireo: scripts/run-bochs.sh --cpu vmx
# --smp 1 (Bochs megs 512) with the same VM line as qemu-svm. Bochs always counts guest time
# in executed instructions (the cpu line's ips=, 40000000 in boot/bochsrc.in: its TSC, PIT,
# HPET and APIC timer advance with instructions, not with host time), so its figures are as
# deterministic as QEMU's -icount ones; there is no --wall. The TSC counts one per
# instruction, i.e. runs at ips Hz of emulated time (Vireo calibrates 40000500 Hz against the
# PIT), but natively Linux would take corei7_skylake_x's CPUID frequency (3.5 GHz) as the
# TSC's and run its clock 87.5 times slow: the kernel command line has tsc_early_khz=ips/1000
# (Linux then also refines it against the HPET). It also has console=ttyS0,115200: Bochs's
# UART keeps the baud rate (Linux's default 9600 would make every console line take tens of
# milliseconds of guest time, drained by interrupts during the next benchmark). Both sides are killed after a limit (--timeout), and a boot whose
# serial log lacks "score: done" is reported as failed. In each boot the guest runs the whole list of
# benchmarks R times (rounds); scorebench times its loop with clock_gettime(CLOCK_MONOTONIC)
# and prints "score: name=X iterations=N ns_per_op=F". Under Vireo, vireo.ko loads and
# scorebench writes /sys/hypervisor/vireo/mark just before its loop and reads
# exits_since_mark just after ("score: exits name=X elapsed_ns=T KIND=COUNT ..."): exits per
# second by reason = COUNT / T (guest time), averaged over the rounds. Natively the module
# refuses to load and there are no exit figures.
#
# Means and 95% confidence intervals (Student t) over the rounds (pooled over --boots boots);
# the ratio's interval by the delta method from the two sides' intervals. No pass/fail on
# timing: the figures are printed and written to OUT/scoreboard.json and OUT/scoreboard.svg
# (ratio bars with their intervals as whiskers), with the serial logs in OUT/logs/.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

EMULATORS=(qemu-svm bochs-vmx)
ALL_BENCHES=(null sigsegv sigfpe fork exec pipe mmap pagefault compute sysbench-threads perf-syscall perf-pipe
    perf-messaging stress-ng-switch dbench)
# Default iterations per round (0.07-0.3 s of guest time each under -icount, about 1.4 s a
# round; in host time about 5 s natively and 23 s under Vireo, where the boot itself takes
# about 35 s), and dbench's seconds (about 2.1 s of guest time with its start and clean-up:
# about 7 s of host time natively and 18 s under Vireo). Bochs divides them further
# (bochs_defaults below).
declare -A ITERS=(
    [null]=200000 [sigsegv]=20000 [sigfpe]=20000 [fork]=400 [exec]=300 [pipe]=10000
    [mmap]=10000 [pagefault]=50000 [compute]=20000000 [sysbench-threads]=1000
    [perf-syscall]=200000 [perf-pipe]=10000 [perf-messaging]=20 [stress-ng-switch]=10000 [dbench]=2
)
# dbench's figure is its seconds (-t), not a count of operations: no divisor takes it under 2
# (guests/linux/scoreboard/init.sh, dbench_tmpfs).
declare -A MIN_ITERS=([dbench]=2)
EMULATOR=qemu-svm
REPEATS=""
BOOTS=1
DIVISOR=""
ICOUNT=1
TIMEOUT=0
CONFIG=()
BENCHES=()
OUT=""
MODE=default

usage() {
    cat <<EOF2
Usage: scripts/scoreboard.sh [--emulator qemu-svm|bochs-vmx] [OPTIONS]

The VMI-style overhead scoreboard: micro-benchmarks of the Debian Linux guest (null system
call, SIGSEGV and SIGFPE delivery, fork+wait, fork+exec, pipe round trip, mmap/munmap,
first-touch page faults, a compute loop; and the third-party sysbench threads, perf bench
syscall basic, perf bench sched pipe, perf bench sched messaging, stress-ng --switch and
dbench on a tmpfs: ns per MB from its MB/s, at least 2 s of guest time) natively and as a
1-vCPU VM under Vireo in the same emulator, in one run: per benchmark the native and Vireo
ns per operation, the ratio Vireo/native with a 95% confidence interval over the
repetitions, and the VM's exits per second by reason. The method is in this script's header.
Durations (plus waits for the emulator lock; more on a loaded host; dbench alone takes about
2 s of guest time a round whatever the divisor):
  qemu-svm   about 8 minutes by default, 2.5 with --quick, 1.5 with --tiny
  bochs-vmx  about 15 minutes by default, 4.5 with --quick, 3 with --tiny

Options:
  --emulator E       qemu-svm (default): QEMU TCG, AMD SVM (cpu qemu64,+svm,+npt), native
                     side QEMU -kernel; bochs-vmx: Bochs, Intel VMX (cpu corei7_skylake_x,
                     as scripts/run-bochs.sh --cpu vmx), native side a GRUB ISO booting the
                     same kernel, initramfs and command line
  --quick            fewer repetitions and iterations (qemu-svm: 2 repetitions, 1/2 of the
                     iterations; bochs-vmx: 2 repetitions, 1/4)
  --tiny             for tests: 2 repetitions, 1/100 of the iterations (the boots dominate)
  --repeats R        rounds over the benchmarks per boot (default 8)
  --boots B          boots per side (default $BOOTS); the rounds of all boots are pooled
  --divide D         divide every benchmark's iterations by D (default: qemu-svm 1,
                     bochs-vmx 2; --quick and --tiny set their own; D given here wins)
  --only LIST        comma-separated benchmarks (default: all: ${ALL_BENCHES[*]})
  --config KEY=VAL   appended to the VM's line (repeatable; default: pv=kvm), e.g. pv=off
  --wall             qemu-svm only: wall-clock timing: no -icount (multi-threaded TCG, guest
                     time = host time; figures then move with the load of the host)
  --out DIR          where scoreboard.json, scoreboard.svg and logs/ go (default
                     build/scoreboard for qemu-svm, build/scoreboard-bochs-vmx for bochs-vmx)
  --timeout S        limit of each boot in seconds (default: from the work asked)
  -h, --help         this text

Environment: VIREO_EMU_LOCK=FILE runs each emulator boot under flock FILE (for machines
shared with others; the wait is not counted in the durations printed).

Figures go to stdout; progress and failures to stderr. Exit status 0 if every benchmark has
figures on both sides and none failed in the guest, 1 otherwise (a boot that does not finish
its benchmarks, a timeout included, is reported with the end of its serial log and of its
run's messages; a benchmark that fails in the guest, with its "score: failed" line and the
output before it).
EOF2
}

posint() {
    [[ "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] || usage_error "$1 wants a positive number, not '$2'"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --quick) MODE=quick ;;
        --tiny) MODE=tiny ;;
        --wall) ICOUNT=0 ;;
        --emulator)
            need_arg "$1" "$#"
            [[ " ${EMULATORS[*]} " == *" $2 "* ]] || usage_error "--emulator wants one of: ${EMULATORS[*]}; not '$2'"
            EMULATOR="$2"
            shift ;;
        --repeats|--boots|--divide|--timeout)
            need_arg "$1" "$#"
            posint "$1" "$2"
            case "$1" in
                --repeats) REPEATS="$2" ;;
                --boots) BOOTS="$2" ;;
                --divide) DIVISOR="$2" ;;
                --timeout) TIMEOUT="$2" ;;
            esac
            shift ;;
        --only)
            need_arg "$1" "$#"
            IFS=, read -r -a BENCHES <<<"$2"
            shift ;;
        --config)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[A-Za-z0-9_.]+=[^[:space:]]+$ ]] || usage_error "--config wants KEY=VALUE, not '$2'"
            CONFIG+=("$2")
            shift ;;
        --out)
            need_arg "$1" "$#"
            OUT="$(abspath "$2")"
            shift ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ ${#BENCHES[@]} -gt 0 ]] || BENCHES=("${ALL_BENCHES[@]}")
for b in "${BENCHES[@]}"; do
    [[ -n "${ITERS[$b]:-}" ]] || usage_error "unknown benchmark '$b' (known: ${ALL_BENCHES[*]})"
done
[[ ${#CONFIG[@]} -gt 0 ]] || CONFIG=(pv=kvm)
# Repetitions and divisor by emulator and mode (--repeats and --divide win). Bochs, measured
# here (from --tiny and --quick --divide 20 runs, host seconds, lock waits excluded): the
# boots with the fixed part of the guest's work take about 52 s natively and 70 s under Vireo
# (Linux reaches /init after 57 s of emulated time, GRUB having loaded the 33 MB of kernel and
# initramfs from the emulated CD), and a round at divisor 1 about 45 s natively and 101 s under
# Vireo (40 s of emulated time natively): the default (8 rounds at 1/2) about 12 minutes,
# --quick (2 at 1/4) about 3.5, --tiny (2 at 1/100) about 2.
case "$EMULATOR:$MODE" in
    qemu-svm:default) DEF_REPEATS=8; DEF_DIVISOR=1 ;;
    qemu-svm:quick) DEF_REPEATS=2; DEF_DIVISOR=2 ;;
    bochs-vmx:default) DEF_REPEATS=8; DEF_DIVISOR=2 ;;
    bochs-vmx:quick) DEF_REPEATS=2; DEF_DIVISOR=4 ;;
    *:tiny) DEF_REPEATS=2; DEF_DIVISOR=100 ;;
esac
[[ -n "$REPEATS" ]] || REPEATS="$DEF_REPEATS"
[[ -n "$DIVISOR" ]] || DIVISOR="$DEF_DIVISOR"
if [[ "$EMULATOR" == bochs-vmx ]]; then
    [[ "$ICOUNT" == 1 ]] || usage_error "--wall is for qemu-svm: Bochs always counts guest time in instructions"
fi
[[ -n "$OUT" ]] || OUT="$VIREO_ROOT/build/scoreboard$([[ "$EMULATOR" == qemu-svm ]] || echo "-$EMULATOR")"

T_START="$(now)"
DEPS=(rust host iso linux bench)
if [[ "$EMULATOR" == qemu-svm ]]; then DEPS+=(qemu); else DEPS+=(bochs); fi
"$VIREO_ROOT/scripts/install-deps.sh" --quiet "${DEPS[@]}"
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"
GUEST="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)"
KERNEL="$(sed -n 's/^kernel=//p' <<<"$GUEST")"
MODULE="$(sed -n 's/^module=//p' <<<"$GUEST")"
[[ -s "$KERNEL" ]] || die "scripts/guest-linux.sh named no kernel"
[[ -s "$MODULE" ]] || die "scripts/guest-linux.sh named no vireo.ko"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-scoreboard.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT/logs"
rm -f "$OUT"/logs/*.log "$OUT"/logs/*.err "$OUT/scoreboard.json" "$OUT/scoreboard.svg"
INITRD="$VIREO_ROOT/build/scoreboard/initramfs.cpio.gz"
SRC="$VIREO_ROOT/guests/linux/scoreboard"

# make_initramfs: build/scoreboard/initramfs.cpio.gz (reproducible, replaced only when its
# bytes change), with the benchmark programs compiled now.
make_initramfs() {
    local stage="$WORK/stage" a out="$INITRD"
    mkdir -p "$(dirname "$out")" "$stage"/{bin,dev,proc,sys,tmp,lib/modules}
    chmod 1777 "$stage/tmp"
    gcc -O2 -static -Wall -o "$stage/bin/scorebench" "$SRC/scorebench.c" || die "cannot build $SRC/scorebench.c"
    gcc -O2 -static -nostdlib -Wall -o "$stage/bin/nullprog" "$SRC/nullprog.c" || die "cannot build $SRC/nullprog.c"
    [[ -x /bin/busybox ]] || die "no /bin/busybox (scripts/install-deps.sh linux installs busybox-static)"
    cp /bin/busybox "$stage/bin/busybox"
    cp "$SRC/init.sh" "$stage/init"
    cp "$MODULE" "$stage/lib/modules/vireo.ko"
    add_dynamic "$(command -v sysbench)" "$stage" sysbench
    add_dynamic "$(command -v perf)" "$stage" perf
    add_dynamic "$(command -v stress-ng)" "$stage" stress-ng
    add_dynamic "$(command -v dbench)" "$stage" dbench
    [[ -s /usr/share/dbench/client.txt ]] || die "no /usr/share/dbench/client.txt (scripts/install-deps.sh bench installs dbench)"
    install -D -m 644 /usr/share/dbench/client.txt "$stage/usr/share/dbench/client.txt"
    chmod 755 "$stage/bin/busybox" "$stage/init"
    for a in sh mount umount mkdir poweroff insmod nproc uname tr sleep awk tail stty; do
        ln -s busybox "$stage/bin/$a"
    done
    find "$stage" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
    (cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio -o -H newc --reproducible -R 0:0 --quiet) | gzip -9 -n >"$out.tmp"
    if cmp -s "$out.tmp" "$out"; then rm -f "$out.tmp"; else mv -f "$out.tmp" "$out"; fi
}

# The guest's work, the same on both sides.
SB_ITERS=""
for b in "${BENCHES[@]}"; do
    n=$(( ITERS[$b] / DIVISOR ))
    [[ "$n" -ge "${MIN_ITERS[$b]:-1}" ]] || n="${MIN_ITERS[$b]:-1}"
    SB_ITERS+="${SB_ITERS:+,}$b:$n"
done
# Bochs: the UART sends at the baud rate set: 115200 rather than Linux's default 9600; and the
# TSC's rate is given (the header).
BOCHS_IPS="$(sed -n 's/^cpu:.*ips=\([0-9]*\).*/\1/p' "$VIREO_ROOT/boot/bochsrc.in" | head -n 1)"
[[ "$EMULATOR" != bochs-vmx || -n "$BOCHS_IPS" ]] || die "no ips= on boot/bochsrc.in's cpu line"
GUEST_CLOCK="console=ttyS0"
[[ "$EMULATOR" != bochs-vmx ]] || GUEST_CLOCK="console=ttyS0,115200 tsc_early_khz=$(( BOCHS_IPS / 1000 ))"
APPEND="$GUEST_CLOCK panic=-1 sb_iters=$SB_ITERS sb_reps=$REPEATS"
VM_LINE="linux mem=256M cpus=1 ${CONFIG[*]}"

QEMU_ICOUNT=()
VIREO_EXTRA=()
TCG_THREAD=multi
if [[ "$ICOUNT" == 1 ]]; then
    TCG_THREAD=single
    QEMU_ICOUNT=(-icount "shift=0,sleep=off")
    VIREO_EXTRA=(-- "${QEMU_ICOUNT[@]}")
fi
# Limit of a boot: generous, from the work asked (QEMU: a round at divisor 1 takes about 23
# s of host time under Vireo on this machine, about 5 s natively; Bochs: the figures above).
if [[ "$TIMEOUT" -gt 0 ]]; then
    LIMIT="$TIMEOUT"
elif [[ "$EMULATOR" == qemu-svm ]]; then
    LIMIT=$(( 180 + 50 * REPEATS / DIVISOR ))
else
    LIMIT=$(( 300 + 400 * REPEATS / DIVISOR ))
fi
# dbench's time is not divided: about 18 s (QEMU) or 19 s (Bochs) of host time a round under
# Vireo, twice that here.
if [[ "$TIMEOUT" -eq 0 && " ${BENCHES[*]} " == *" dbench "* ]]; then
    LIMIT=$(( LIMIT + 40 * REPEATS ))
fi

: >"$WORK/durations"
# boot SIDE LOG: one boot, native or vireo, the serial log in LOG, the emulator's or run
# script's messages (stderr) in LOG less .log plus .err; its seconds (the lock wait excluded)
# appended to $WORK/durations; BOOT_RC its status (124 or 137: killed at the limit).
boot() {
    local side="$1" log="$2" t0 rc=0 err="${2%.log}.err"
    emu_lock
    t0="$(now)"
    case "$EMULATOR:$side" in
        qemu-svm:native)
            timeout -k 5 "$LIMIT" qemu-system-x86_64 -accel "tcg,thread=$TCG_THREAD" -cpu qemu64,+svm,+npt \
                -m 256 -smp 1 -display none -serial "file:$log" -monitor none -no-reboot -nic none \
                -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" ${QEMU_ICOUNT[@]+"${QEMU_ICOUNT[@]}"} \
                </dev/null >/dev/null 2>"$err" || rc=$? ;;
        qemu-svm:vireo)
            VIREO_TCG_THREAD="$TCG_THREAD" "$VIREO_ROOT/scripts/run-qemu.sh" --headless --accel tcg --timeout "$LIMIT" \
                --elf "$ELF" --log "$log" --smp 1 --module "$KERNEL=$VM_LINE -- $APPEND" \
                --module "$INITRD=linux:initrd" ${VIREO_EXTRA[@]+"${VIREO_EXTRA[@]}"} >/dev/null 2>"$err" || rc=$? ;;
        # run-bochs.sh's own verdict looks for Vireo's "exit status=ok" line, which a native
        # Linux never prints: its status counts here only as a timeout (124).
        bochs-vmx:native)
            "$VIREO_ROOT/scripts/run-bochs.sh" --cpu vmx --headless --timeout "$LIMIT" --iso "$NATIVE_ISO" \
                --smp 1 --mem 256 --log "$log" >/dev/null 2>"$err" || rc=$? ;;
        bochs-vmx:vireo)
            "$VIREO_ROOT/scripts/run-bochs.sh" --cpu vmx --headless --timeout "$LIMIT" \
                --elf "$ELF" --log "$log" --smp 1 --module "$KERNEL=$VM_LINE -- $APPEND" \
                --module "$INITRD=linux:initrd" >/dev/null 2>"$err" || rc=$? ;;
    esac
    elapsed "$t0" >>"$WORK/durations"
    echo >>"$WORK/durations"
    emu_unlock
    [[ -f "$log" ]] || : >"$log"
    BOOT_RC="$rc"
}

cp "$VIREO_ROOT/scripts/benchstats.py" "$WORK/"
cat >"$WORK/an.py" <<'PY'
import json, re, sys

from benchstats import ratio_ci, stats  # scripts/benchstats.py, copied beside this file

def parse(path):
    """{name: [ns_per_op...]}, {name: [{kind: rate}...]}, whether the guest said done."""
    ns, rates, done, start = {}, {}, False, ""
    with open(path, errors="replace") as f:
        for l in f:
            l = re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", "", l.replace("\r", ""))
            m = re.search(r"score: name=(\S+) iterations=(\d+) ns_per_op=([0-9.]+)", l)
            if m:
                ns.setdefault(m.group(1), []).append(float(m.group(3)))
            m = re.search(r"score: exits name=(\S+) elapsed_ns=([0-9.]+)((?: \S+=\d+)*)", l)
            if m and float(m.group(2)) > 0:
                t = float(m.group(2)) / 1e9
                kinds = dict((k, int(v) / t) for k, v in re.findall(r" (\S+)=(\d+)", m.group(3)))
                rates.setdefault(m.group(1), []).append(kinds)
            m = re.search(r"score: start (.*)", l)
            if m:
                start = m.group(1).strip()
            if "score: done" in l:
                done = True
    return ns, rates, done, start

ratio = ratio_ci

# Benchmarks whose "operation" is not a count of iterations (also in the JSON, as "operation").
OPERATION = {
    "dbench": "a throughput benchmark: one operation = 1 MB of dbench's reads and writes, "
              "ns_per_op = 1e9 / its MB/s, so the ratio is native MB/s / Vireo MB/s",
}

def fmt(x, nd=3):
    if x is None:
        return "n/a"
    a = abs(x)
    return ("%%.%df" % nd) % x if a < 10 else "%.2f" % x if a < 1000 else "%.0f" % x

def svg(rows, path, title):
    ok = [r for r in rows if r["ratio"] is not None]
    top, left, bar, gap, width = 50, 110, 22, 12, 480
    hi = max([1.2] + [r["ratio"] + (r["ratio_ci95"] or 0) for r in ok]) * 1.1
    x = lambda v: left + width * v / hi
    h = top + len(rows) * (bar + gap) + 40
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (left + width + 120, h),
         '<rect width="100%" height="100%" fill="white"/>',
         '<text x="10" y="20" font-size="14">%s</text>' % title,
         '<text x="10" y="38" fill="#555">Vireo / native, ns per operation (lower is better); whiskers: 95% CI</text>']
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        o.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (left - 8, y + bar * 0.7, r["name"]))
        if r["ratio"] is None:
            o.append('<text x="%d" y="%d" fill="#a00">no figures</text>' % (left + 4, y + bar * 0.7))
            continue
        o.append('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>' % (
            left, y, x(r["ratio"]) - left, bar, "#4a7ab5" if r["ratio"] < 1.25 else "#c0504d"))
        if r["ratio_ci95"]:
            lo, up, c = x(max(0, r["ratio"] - r["ratio_ci95"])), x(r["ratio"] + r["ratio_ci95"]), y + bar / 2
            o.append('<path d="M%.1f %.1f H%.1f M%.1f %.1f V%.1f M%.1f %.1f V%.1f" stroke="black" fill="none"/>' % (
                lo, c, up, lo, c - 6, c + 6, up, c - 6, c + 6))
        o.append('<text x="%.1f" y="%d">%.3f</text>' % (x(r["ratio"] + (r["ratio_ci95"] or 0)) + 6, y + bar * 0.7, r["ratio"]))
    base = top + len(rows) * (bar + gap)
    o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333" stroke-dasharray="4 3"/>' % (x(1), top - 6, x(1), base))
    o.append('<text x="%.1f" y="%d" text-anchor="middle">1.0 (native)</text>' % (x(1), base + 16))
    o.append('</svg>')
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")

def main(manifest, benches, out, meta):
    meta = json.loads(meta)
    nat, vir, rates, starts = {}, {}, {}, {}
    for line in open(manifest):
        side, path = line.split()
        ns, rt, done, start = parse(path)
        starts.setdefault(side, start)
        for k, v in ns.items():
            (nat if side == "native" else vir).setdefault(k, []).extend(v)
        if side == "vireo":
            for k, v in rt.items():
                rates.setdefault(k, []).extend(v)
    rows, bad = [], 0
    for b in benches.split(","):
        a, v = nat.get(b, []), vir.get(b, [])
        mn, hn, nn = stats(a)
        mv, hv, nv = stats(v)
        r, h = ratio(v, a)
        kinds = sorted({k for d in rates.get(b, []) for k in d})
        ex = {k: stats([d.get(k, 0) for d in rates.get(b, [])])[0] for k in kinds}
        total = stats([sum(d.values()) for d in rates.get(b, [])])[0] if rates.get(b) else None
        rows.append(dict(name=b, native_ns_per_op=mn, native_ci95=hn, native_n=nn, vireo_ns_per_op=mv,
                         vireo_ci95=hv, vireo_n=nv, ratio=r, ratio_ci95=h, native_samples=a, vireo_samples=v,
                         exits_per_s_total=total, exits_per_s=ex))
        if b in OPERATION:
            rows[-1]["operation"] = OPERATION[b]
            rows[-1]["native_mb_per_s"] = stats([1e9 / x for x in a])[0] if a else None
            rows[-1]["vireo_mb_per_s"] = stats([1e9 / x for x in v])[0] if v else None
        if r is None:
            bad = 1
    for r in rows:
        b = r["name"]
        print("%-10s native  ns_per_op=%s ci95=%s n=%d" % (b, fmt(r["native_ns_per_op"]), fmt(r["native_ci95"]), r["native_n"]))
        print("%-10s vireo   ns_per_op=%s ci95=%s n=%d" % (b, fmt(r["vireo_ns_per_op"]), fmt(r["vireo_ci95"]), r["vireo_n"]))
        print("%-10s ratio   %s ci95=%s" % (b, fmt(r["ratio"]), fmt(r["ratio_ci95"])))
        ex = " ".join("%s=%.1f" % (k, v) for k, v in sorted(r["exits_per_s"].items(), key=lambda kv: -kv[1]) if v)
        print("%-10s exits/s total=%s %s" % (b, "n/a" if r["exits_per_s_total"] is None else "%.1f" % r["exits_per_s_total"], ex))
    print("== summary: Vireo/native (ns per operation), 95% CI")
    for r in rows:
        print("   %-16s %10s ns %10s ns   %s%s   %s exits/s" % (
            r["name"], fmt(r["native_ns_per_op"]), fmt(r["vireo_ns_per_op"]), fmt(r["ratio"]),
            "" if r["ratio_ci95"] is None else " +- " + fmt(r["ratio_ci95"]), fmt(r["exits_per_s_total"], 1)))
    for r in rows:
        if r["name"] in OPERATION:
            print("   (%s: %s; native %s MB/s, Vireo %s MB/s)" % (
                r["name"], OPERATION[r["name"]], fmt(r["native_mb_per_s"]), fmt(r["vireo_mb_per_s"])))
    meta["guest_native"] = starts.get("native", "")
    meta["guest_vireo"] = starts.get("vireo", "")
    doc = dict(meta, benchmarks=rows)
    with open(out + "/scoreboard.json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    svg(rows, out + "/scoreboard.svg", "Vireo overhead scoreboard (%s; %s; %s)" % (meta["emulator"], meta["timing"], meta["config"]))
    return bad

sys.exit(main(*sys.argv[1:]))
PY

make_initramfs
NATIVE_ISO=""
if [[ "$EMULATOR" == bochs-vmx ]]; then
    NATIVE_ISO="$WORK/native.iso"
    "$VIREO_ROOT/scripts/mkiso.sh" --no-deps --quiet --linux "$KERNEL" --initrd "$INITRD" \
        --cmdline "$APPEND" --out "$NATIVE_ISO"
fi
note "ELF $ELF; kernel $KERNEL; initramfs $INITRD; out $OUT"
if [[ "$EMULATOR" == qemu-svm ]]; then
    TIMING="$([[ "$ICOUNT" == 1 ]] && echo "icount shift=0,sleep=off" || echo "wall clock")"
    echo "scoreboard: qemu-svm: QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{ print $4 }') TCG, cpu qemu64,+svm,+npt, $TIMING; host $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $MODE: $REPEATS rounds, iterations / $DIVISOR"
    echo "   native: QEMU -kernel -initrd, -m 256; Vireo: scripts/run-qemu.sh --smp 1 (-m 512)"
else
    TIMING="emulated instructions, ips=$BOCHS_IPS"
    echo "scoreboard: bochs-vmx: Bochs $(dpkg-query -W -f '${Version}' bochs 2>/dev/null || echo '?'), cpu corei7_skylake_x (VMX), $TIMING (guest time counts executed instructions, not host time: deterministic, like QEMU -icount); host $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $MODE: $REPEATS rounds, iterations / $DIVISOR"
    echo "   native: GRUB ISO linux/initrd, megs 256; Vireo: scripts/run-bochs.sh --cpu vmx --smp 1 (megs 512)"
fi
echo "   Vireo $(git -C "$VIREO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), kernel $(sed -n 's/^release=//p' "$(dirname "$KERNEL")/kernel.version" 2>/dev/null || echo '?'); VM: $VM_LINE; --smp 1"
echo "   guest: $APPEND"
MANIFEST="$WORK/manifest"
: >"$MANIFEST"
FAILED=0
BOOT_TIMES=""
for b in $(seq "$BOOTS"); do
    for side in native vireo; do
        log="$OUT/logs/$side-$b.log"
        note "$side boot $b/$BOOTS"
        boot "$side" "$log"
        # (not grep -q: its early exit would fail serial_clean with SIGPIPE, under pipefail)
        if serial_clean "$log" | grep -a 'score: done' >/dev/null; then
            note "  $side boot $b: $(tail -n 1 "$WORK/durations") s"
        else
            why="status $BOOT_RC"
            [[ "$BOOT_RC" != 124 && "$BOOT_RC" != 137 ]] || why="killed at the limit of $LIMIT s"
            note "  $side boot $b did not finish its benchmarks ($why, after $(tail -n 1 "$WORK/durations") s); the last serial lines of $log:"
            serial_clean "$log" | grep -av '^[[:space:]]*$' | tail -n 12 | sed 's/^/    /' >&2 || true
            if [[ -s "${log%.log}.err" ]]; then
                note "  and the last lines of ${log%.log}.err:"
                grep -av '^[[:space:]]*$' "${log%.log}.err" | tail -n 12 | sed 's/^/    /' >&2 || true
            fi
            FAILED=1
        fi
        # A benchmark that failed in the guest (a program or library missing from the image, a
        # run without its figure): init.sh's "score: failed" line and the output before it.
        if serial_clean "$log" | grep -a 'score: failed' >/dev/null; then
            note "  $side boot $b: benchmarks failed in the guest ($log):"
            serial_clean "$log" | grep -a -B6 'score: failed' | grep -av '^[[:space:]]*$' | tail -n 40 | sed 's/^/    /' >&2 || true
            FAILED=1
        fi
        echo "$side $log" >>"$MANIFEST"
        BOOT_TIMES+="${BOOT_TIMES:+, }$side-$b $(tail -n 1 "$WORK/durations") s"
    done
done
META="$(python3 -c 'import json, sys; print(json.dumps(dict(emulator=sys.argv[1], timing=sys.argv[2], config=sys.argv[3], mode=sys.argv[4], repeats=int(sys.argv[5]), divisor=int(sys.argv[6]), boots=int(sys.argv[7]), kernel_cmdline=sys.argv[8], vm_line=sys.argv[9])))' \
    "$EMULATOR" "$TIMING" "${CONFIG[*]}" "$MODE" "$REPEATS" "$DIVISOR" "$BOOTS" "$APPEND" "$VM_LINE")"
python3 "$WORK/an.py" "$MANIFEST" "$(IFS=,; echo "${BENCHES[*]}")" "$OUT" "$META" || FAILED=1
echo "scoreboard: done in $(elapsed "$T_START") s ($(awk '{ s += $1 } END { printf "%.0f", s }' "$WORK/durations") s of emulator time over $(wc -l <"$WORK/durations") boots: $BOOT_TIMES); $OUT/scoreboard.json, $OUT/scoreboard.svg"
exit "$FAILED"
