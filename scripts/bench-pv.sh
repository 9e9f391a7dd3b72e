#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Figures of the KVM paravirtual interface (pv=kvm) against none (pv=off) for a stock Debian
# Linux guest under Vireo in QEMU TCG (AMD SVM emulated). Both sides are measured in this run,
# interleaved (kvm, off, kvm, off, ...), REPEATS times; means with a 95% confidence interval
# (Student t) where there are two values or more. No pass/fail on timing: the figures are
# printed, and the PV EOI share against its 60% bar.
#
# The guest: build/linux/vmlinuz (scripts/guest-linux.sh) with its own initramfs,
# build/bench-pv/initramfs.cpio.gz: busybox, /init = guests/linux/bench/init.sh and the static
# programs clockbench, timerbench and lockbench built from guests/linux/bench/*.c (gcc -O2
# -static) each time this script runs. Its phases are chosen by bench_pv_* keys on the kernel
# command line and framed by "bench-pv: mark phase=NAME begin|end uptime=S" lines.
#
# 1. Exits per second (--part exits): a 2-vCPU VM on 2 host CPUs, booted three times per mode
#    and repeat: "base" (boots and powers off), "idle" (sleeps --seconds S) and "timer"
#    (timerbench: --timer-threads threads each nanosleep(--timer-us) in a loop for S seconds).
#    Boot and shutdown cancel out in the differences: rate = (figure(idle or timer) -
#    figure(base)) / phase length, the phase timed by the guest (/proc/uptime, 10 ms steps)
#    from its mark lines. The figures are Vireo's at the VM's end: total exits (the exit
#    table), EOI exits (EOI register writes that exited: `eoi_exits`) and EOIs the guest
#    skipped through PV EOI (`pv_eois`), summed over the vCPUs. The PV EOI share is
#    pv_eois / (pv_eois + eoi_exits) under pv=kvm, in the timer phase (differences) and over
#    whole runs (all pv=kvm boots of this part); the issue's bar is 60%. The differences of
#    two boots are noisy when the phase adds few exits to a boot's; make S longer then.
# 2. Clock read cost and lock-holder preemption (--part lock): a VM of --lock-vcpus (4) vCPUs
#    on --lock-host-cpus (2) host CPUs, one boot per mode and repeat. First clockbench:
#    clock_gettime(CLOCK_MONOTONIC) --clock-calls times, ns per call (and the clocksource:
#    pv=kvm gives kvm-clock, read in the vDSO without exits; pv=off on QEMU's CPU model gives
#    acpi_pm, a port read and so an exit per call). Then --lock-rounds rounds of lockbench:
#    --lock-threads (4) threads for --lock-seconds each, mode mmap (mmap/touch/munmap of a few
#    pages: mmap_lock, page-table locks, TLB shootdowns) or futex (futex hash-bucket
#    spinlocks), ops/s. With the vCPUs overcommitted, a lock holder (or a TLB-shootdown
#    target) can lose its host CPU for a whole slice; pv=kvm gives the guest steal time and
#    the preempted flag (vcpu_is_preempted: rwsem/mutex spinners stop spinning on a preempted
#    owner), PV spinlocks (waiters halt, KICK_CPU wakes them), PV TLB flush (no IPI to a
#    preempted vCPU) and PV IPIs. Each round is followed by a control round (unless
#    --no-control): --lock-control-threads (2) threads pinned to vCPUs 0 and 1, the other
#    vCPUs idle (halted), i.e. no more running vCPUs than host CPUs. The ratio kvm/off of the
#    overcommitted rounds over that of the control rounds is the part of the gain that comes
#    with overcommitment; the control's own ratio is what pv=kvm gives without it (kvm-clock
#    against acpi_pm counts there: e.g. the kernel reads its clocksource on every timer tick).
#    Also printed: Vireo's PV counters of those boots (kicks, yields, slices that ended with
#    the preempted flag set, TLB flushes done for preempted vCPUs, PV IPIs), per boot.
#
# QEMU runs as run-qemu.sh starts it: TCG, one host thread per emulated CPU, guest time = host
# time. --icount adds `-icount shift=0,sleep=off` (single-threaded TCG; guest time counts
# instructions, idle time is skipped): more repeatable on a busy machine, but then a host CPU
# is not a host core, and idle phases take no host time.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPEATS=3
SECONDS_PHASE=4
TIMER_THREADS=2
TIMER_US=200
CLOCK_CALLS=20000
LOCK_SECONDS=4
LOCK_ROUNDS=2
LOCK_THREADS=4
LOCK_VCPUS=4
LOCK_HOST_CPUS=2
LOCK_MODE=mmap
LOCK_PAGES=4
CONTROL_THREADS=2
CONTROL=1
ICOUNT=0
TIMEOUT=0
PARTS=()
QUICK=0

usage() {
    cat <<EOF2
Usage: scripts/bench-pv.sh [OPTIONS]

Figures of Vireo's KVM paravirtual interface (pv=kvm) against none (pv=off) for the Debian
Linux guest in QEMU TCG, both measured in this run, interleaved: exits per second of an idle
and of a timer-heavy guest, EOI exits and the share of EOIs PV EOI removed (bar: 60%), the
cost of clock_gettime, and the throughput of a kernel-lock-heavy program with 4 vCPUs on 2
host CPUs (lock-holder preemption), with a control without overcommitment. The method is in
this script's header. About 8 minutes by default, 3 with --quick (plus waits for the lock).

Options:
  --quick                   shorter: --repeats 1 --seconds 2 --clock-calls 10000
                            --lock-seconds 3 (options after it still apply)
  --part exits|lock         run only this part (repeatable; default: both)
  --repeats R               boots per configuration and mode (default $REPEATS)
  --seconds S               length of the idle and timer phases (default $SECONDS_PHASE)
  --timer-threads N         timerbench threads (default $TIMER_THREADS)
  --timer-us US             timerbench sleep per loop, microseconds (default $TIMER_US)
  --clock-calls N           clock_gettime calls per clockbench run (default $CLOCK_CALLS)
  --lock-seconds S          length of each lockbench round (default $LOCK_SECONDS)
  --lock-rounds K           lockbench rounds per boot (default $LOCK_ROUNDS)
  --lock-threads N          lockbench threads (default $LOCK_THREADS)
  --lock-vcpus N            vCPUs of the lock VM (default $LOCK_VCPUS)
  --lock-host-cpus N        host CPUs (QEMU -smp) of the lock boots (default $LOCK_HOST_CPUS)
  --lock-mode mmap|futex    lockbench's workload (default $LOCK_MODE)
  --lock-control-threads N  threads of the pinned control round (default $CONTROL_THREADS)
  --no-control              no control rounds
  --icount                  QEMU -icount shift=0,sleep=off (single-threaded TCG)
  --timeout S               limit of each boot in seconds (default: from the phase lengths)
  -h, --help                this text

Environment: VIREO_EMU_LOCK=FILE runs each emulator boot under flock FILE (for machines
shared with others; the wait is not counted in the durations printed).

Figures go to stdout; progress and failures (with the serial lines that show them) to stderr.
Exit status 0 if every part gave its figures, 1 if a part could not be measured.
EOF2
}

posint() {
    [[ "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] || usage_error "$1 wants a positive number, not '$2'"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --quick) QUICK=1; REPEATS=1; SECONDS_PHASE=2; CLOCK_CALLS=10000; LOCK_SECONDS=3 ;;
        --part)
            need_arg "$1" "$#"
            case "$2" in exits|lock) PARTS+=("$2") ;; *) usage_error "--part wants exits or lock, not '$2'" ;; esac
            shift ;;
        --repeats|--seconds|--timer-threads|--timer-us|--clock-calls|--lock-seconds|--lock-rounds|--lock-threads|--lock-vcpus|--lock-host-cpus|--lock-control-threads|--timeout)
            need_arg "$1" "$#"
            posint "$1" "$2"
            case "$1" in
                --repeats) REPEATS="$2" ;;
                --seconds) SECONDS_PHASE="$2" ;;
                --timer-threads) TIMER_THREADS="$2" ;;
                --timer-us) TIMER_US="$2" ;;
                --clock-calls) CLOCK_CALLS="$2" ;;
                --lock-seconds) LOCK_SECONDS="$2" ;;
                --lock-rounds) LOCK_ROUNDS="$2" ;;
                --lock-threads) LOCK_THREADS="$2" ;;
                --lock-vcpus) LOCK_VCPUS="$2" ;;
                --lock-host-cpus) LOCK_HOST_CPUS="$2" ;;
                --lock-control-threads) CONTROL_THREADS="$2" ;;
                --timeout) TIMEOUT="$2" ;;
            esac
            shift ;;
        --lock-mode)
            need_arg "$1" "$#"
            case "$2" in mmap|futex) LOCK_MODE="$2" ;; *) usage_error "--lock-mode wants mmap or futex, not '$2'" ;; esac
            shift ;;
        --no-control) CONTROL=0 ;;
        --icount) ICOUNT=1 ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(exits lock)
[[ "$TIMER_THREADS" -le 64 && "$LOCK_THREADS" -le 64 ]] || usage_error "at most 64 threads"
[[ "$CONTROL_THREADS" -le "$LOCK_VCPUS" ]] || usage_error "--lock-control-threads must not exceed --lock-vcpus"

T_START="$(now)"
"$VIREO_ROOT/scripts/install-deps.sh" --quiet all
ELF="$("$VIREO_ROOT/scripts/build.sh" --no-deps | tail -n 1)"
KERNEL="$(sed -n 's/^kernel=//p' <<<"$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)")"
[[ -s "$KERNEL" ]] || die "scripts/guest-linux.sh named no kernel"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-bench-pv.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
OUTDIR="$VIREO_ROOT/build/bench-pv"
INITRD="$OUTDIR/initramfs.cpio.gz"
BENCH_SRC="$VIREO_ROOT/guests/linux/bench"

has_part() {
    local p
    for p in "${PARTS[@]}"; do [[ "$p" == "$1" ]] && return 0; done
    return 1
}

# make_initramfs: build/bench-pv/initramfs.cpio.gz (reproducible, replaced only when its
# bytes change), with the bench programs compiled now.
make_initramfs() {
    local stage="$WORK/stage" p a out
    mkdir -p "$OUTDIR" "$stage"/{bin,dev,proc,sys,tmp}
    chmod 1777 "$stage/tmp"
    for p in clockbench timerbench lockbench; do
        gcc -O2 -static -pthread -Wall -o "$stage/bin/$p" "$BENCH_SRC/$p.c" || die "cannot build $BENCH_SRC/$p.c"
    done
    [[ -x /bin/busybox ]] || die "no /bin/busybox (scripts/install-deps.sh linux installs busybox-static)"
    cp /bin/busybox "$stage/bin/busybox"
    cp "$BENCH_SRC/init.sh" "$stage/init"
    chmod 755 "$stage/bin/busybox" "$stage/init"
    for a in sh mount sleep poweroff awk nproc uname; do
        ln -s busybox "$stage/bin/$a"
    done
    find "$stage" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
    out="$INITRD"
    (cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio -o -H newc --reproducible -R 0:0 --quiet) | gzip -9 -n >"$out.tmp"
    if cmp -s "$out.tmp" "$out"; then rm -f "$out.tmp"; else mv -f "$out.tmp" "$out"; fi
}

QEMU_EXTRA=()
if [[ "$ICOUNT" == 1 ]]; then
    export VIREO_TCG_THREAD=single
    QEMU_EXTRA=(-- -icount "shift=0,sleep=off")
fi

# boot LOG HOST_CPUS VCPUS PV LIMIT APPEND: one headless boot of the Linux VM; the serial log
# in LOG; the seconds the emulator ran (the lock wait excluded) appended to $WORK/durations.
boot() {
    local log="$1" smp="$2" cpus="$3" pv="$4" limit="$5" append="$6" t0 rc=0
    emu_lock
    t0="$(now)"
    "$VIREO_ROOT/scripts/run-qemu.sh" --headless --accel tcg --timeout "$limit" --elf "$ELF" --log "$log" \
        --smp "$smp" --module "$KERNEL=linux mem=256M cpus=$cpus pv=$pv -- console=ttyS0 panic=-1 $append" \
        --module "$INITRD=linux:initrd" ${QEMU_EXTRA[@]+"${QEMU_EXTRA[@]}"} >/dev/null 2>&1 || rc=$?
    elapsed "$t0" >>"$WORK/durations"
    echo >>"$WORK/durations"
    emu_unlock
    [[ -f "$log" ]] || : >"$log"
    BOOT_RC="$rc"
}

# The analysis: python3 "$WORK/an.py" COMMAND ARGS (see its functions).
cp "$VIREO_ROOT/scripts/benchstats.py" "$WORK/"
cat >"$WORK/an.py" <<'PY'
import re, sys

from benchstats import ratio_ci, stats  # scripts/benchstats.py, copied beside this file

def clean(path):
    with open(path, errors="replace") as f:
        return [re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", "", l.replace("\r", "")) for l in f]

def parse(path):
    """A boot's figures as a dict (None if the VM did not end powered off)."""
    d = {"exits": None, "phases": {}, "lock": [], "control": [], "reasons": {}}
    pv = dict(eoi_exits=0, pv_eois=0, kicks=0, pv_ipis=0, pv_ipi_targets=0, yields=0,
              tlb_flushes=0, preempted=0)
    d.update(pv)
    d["steal_us"] = d["run_us"] = 0
    begin = {}
    for l in clean(path):
        m = re.search(r"vireo: vm name=linux end outcome=(\S+) exits=(\d+)", l)
        if m:
            d["outcome"] = m.group(1); d["exits"] = int(m.group(2))
        m = re.search(r"vireo: vm name=linux exit reason=(\S+) count=(\d+)", l)
        if m:
            d["reasons"][m.group(1)] = int(m.group(2))
        m = re.search(r"vireo: vm name=linux vcpu=\d+ exits=\d+ slices=\d+ run_us=(\d+) steal_us=(\d+)", l)
        if m:
            d["run_us"] += int(m.group(1)); d["steal_us"] += int(m.group(2))
        if "vireo: vm name=linux pv vcpu=" in l:
            for k in pv:
                m = re.search(r" %s=(\d+)" % k, l)
                if m:
                    d[k] += int(m.group(1))
        m = re.search(r"bench-pv: mark phase=(\S+) (begin|end) uptime=([0-9.]+)", l)
        if m:
            if m.group(2) == "begin":
                begin[m.group(1)] = float(m.group(3))
            elif m.group(1) in begin:
                d["phases"][m.group(1)] = d["phases"].get(m.group(1), 0) + float(m.group(3)) - begin.pop(m.group(1))
        m = re.search(r"bench-pv: start cpus=(\d+) clocksource=(\S+)", l)
        if m:
            d["cpus"] = int(m.group(1)); d["clocksource"] = m.group(2)
        m = re.search(r"bench-pv: clock clocksource=(\S+) calls=\d+ ns_per_call=([0-9.]+)", l)
        if m:
            d["clock_ns"] = float(m.group(2))
        m = re.search(r"bench-pv: timer .* wakeups_per_s=(\d+)", l)
        if m:
            d["wakeups_per_s"] = int(m.group(1))
        m = re.search(r"bench-pv: lock mode=\S+ threads=\d+ pin=(\d) .* ops_per_s=(\d+)", l)
        if m:
            d["control" if m.group(1) == "1" else "lock"].append(int(m.group(2)))
    if d["exits"] is None or d.get("outcome") != "powered-off":
        return None
    return d

def fmt(x):
    if x is None:
        return "n/a"
    a = abs(x)
    return "%.3f" % x if a < 10 else "%.1f" % x if a < 1000 else "%.0f" % x

def show(v, unit=""):
    m, h, n = stats(v)
    if m is None:
        return "n/a"
    if h is None:
        return "%s%s (n=1, no CI)" % (fmt(m), unit)
    return "%s%s +- %s (95%% CI, n=%d)" % (fmt(m), unit, fmt(h), n)

def ratio(a, b):
    """ratio of the means of a and b with an approximate 95% CI (delta method), as text."""
    r, h = ratio_ci(a, b)
    if r is None:
        return None, "n/a"
    if h is None:
        return r, "%.2fx (no CI)" % r
    return r, "%.2fx +- %.2f (approx. 95%% CI)" % (r, h)

def load(manifest):
    runs = []
    for line in open(manifest):
        part, mode, kind, rep, path = line.split()
        runs.append(dict(part=part, mode=mode, kind=kind, rep=int(rep), d=parse(path)))
    return runs

def one(path):
    """One line about a boot, for the progress output."""
    d = parse(path)
    if d is None:
        print("no figures (the VM did not end powered off)")
        sys.exit(1)
    s = "exits=%d eoi_exits=%d pv_eois=%d clocksource=%s" % (d["exits"], d["eoi_exits"], d["pv_eois"], d.get("clocksource", "?"))
    for k, v in sorted(d["phases"].items()):
        s += " %s_s=%.2f" % (k, v)
    if "clock_ns" in d: s += " clock_ns=%.1f" % d["clock_ns"]
    if "wakeups_per_s" in d: s += " wakeups_per_s=%d" % d["wakeups_per_s"]
    if d["lock"]: s += " lock_ops_per_s=%s" % ",".join(map(str, d["lock"]))
    if d["control"]: s += " control_ops_per_s=%s" % ",".join(map(str, d["control"]))
    if d["kicks"] or d["yields"] or d["preempted"]:
        s += " kicks=%d yields=%d preempted=%d tlb_flushes=%d pv_ipis=%d steal_ms=%d" % (
            d["kicks"], d["yields"], d["preempted"], d["tlb_flushes"], d["pv_ipis"], d["steal_us"] // 1000)
    print(s)

SUMMARY = []

def exits(manifest):
    runs = [r for r in load(manifest) if r["part"] == "exits"]
    by = {}
    for r in runs:
        if r["d"] is not None:
            by[(r["mode"], r["kind"], r["rep"])] = r["d"]
    rates = {}
    for (mode, kind, rep), d in by.items():
        if kind == "base":
            continue
        b = by.get((mode, "base", rep))
        t = d["phases"].get(kind)
        if b is None or not t:
            continue
        for k in ("exits", "eoi_exits", "pv_eois"):
            rates.setdefault((mode, kind, k), []).append((d[k] - b[k]) / t)
    print("   per second of the phase (figure(phase boot) - figure(base boot)) / phase length:")
    for kind in ("idle", "timer"):
        for mode in ("kvm", "off"):
            print("   %-5s pv=%-3s exits/s %s" % (kind, mode, show(rates.get((mode, kind, "exits"), []))))
            print("               eoi_exits/s %s   pv_eois/s %s" % (
                show(rates.get((mode, kind, "eoi_exits"), [])), show(rates.get((mode, kind, "pv_eois"), []))))
        r, txt = ratio(rates.get(("off", kind, "exits"), []), rates.get(("kvm", kind, "exits"), []))
        print("   %-5s exits/s off/kvm: %s" % (kind, txt))
        if kind == "timer":
            # The guests do not manage the same wake-ups per second: per wake-up too.
            per = {}
            for mode in ("kvm", "off"):
                for (m, k, rep), d in by.items():
                    b = by.get((m, "base", rep))
                    if m == mode and k == "timer" and b and d.get("wakeups_per_s") and d["phases"].get("timer"):
                        per.setdefault(mode, []).append((d["exits"] - b["exits"]) / (d["wakeups_per_s"] * d["phases"]["timer"]))
                print("   timer pv=%-3s wake-ups/s %s   exits per wake-up %s" % (
                    mode, show([d["wakeups_per_s"] for (m, k, _), d in by.items() if m == mode and k == "timer"]),
                    show(per.get(mode, []))))
            SUMMARY.append(("timer exits per wake-up", fmt(stats(per.get("kvm", []))[0]), fmt(stats(per.get("off", []))[0]), ""))
        SUMMARY.append(("%s exits/s (pv=kvm | pv=off)" % kind,
                        fmt(stats(rates.get(("kvm", kind, "exits"), []))[0]),
                        fmt(stats(rates.get(("off", kind, "exits"), []))[0]), "off/kvm %s" % (fmt(r) if r else "n/a")))
        SUMMARY.append(("%s EOI exits/s" % kind,
                        fmt(stats(rates.get(("kvm", kind, "eoi_exits"), []))[0]),
                        fmt(stats(rates.get(("off", kind, "eoi_exits"), []))[0]), ""))
    # PV EOI share: timer phase (differences) and whole runs.
    shares = []
    for rep in sorted({r for (_, _, r) in by}):
        d, b = by.get(("kvm", "timer", rep)), by.get(("kvm", "base", rep))
        if d and b:
            pe, ee = d["pv_eois"] - b["pv_eois"], d["eoi_exits"] - b["eoi_exits"]
            if pe + ee > 0:
                shares.append(100.0 * pe / (pe + ee))
    kv = [d for (m, _, _), d in by.items() if m == "kvm"]
    tot_pe = sum(d["pv_eois"] for d in kv); tot_ee = sum(d["eoi_exits"] for d in kv)
    whole = 100.0 * tot_pe / (tot_pe + tot_ee) if tot_pe + tot_ee else None
    off_ee = sum(d["eoi_exits"] for (m, _, _), d in by.items() if m == "off")
    print("   PV EOI removed, timer phase (pv=kvm): %s" % show(shares, "%"))
    if whole is not None:
        print("   PV EOI removed, whole runs (pv=kvm, %d boots): %.1f%% (pv_eois=%d eoi_exits=%d; pv=off boots: eoi_exits=%d)"
              % (len(kv), whole, tot_pe, tot_ee, off_ee))
    m = stats(shares)[0]
    verdict = lambda x: "n/a" if x is None else ("meets 60%" if x >= 60 else "BELOW 60%")
    print("   issue's bar (PV EOI removes >= 60%% of EOI exits): timer phase %s, whole runs %s" % (verdict(m), verdict(whole)))
    SUMMARY.append(("PV EOI share of EOIs, timer phase", fmt(m) + "%" if m is not None else "n/a", "-", verdict(m)))
    SUMMARY.append(("PV EOI share of EOIs, whole runs", fmt(whole) + "%" if whole is not None else "n/a", "-", verdict(whole)))
    return 0 if rates and shares else 1

def lock(manifest):
    runs = [r for r in load(manifest) if r["part"] == "lock" and r["d"] is not None]
    get = lambda mode, key: [x for r in runs if r["mode"] == mode for x in
                             (r["d"][key] if isinstance(r["d"].get(key), list) else [r["d"].get(key)])]
    cs = {m: sorted({r["d"].get("clocksource", "?") for r in runs if r["mode"] == m}) for m in ("kvm", "off")}
    for mode in ("kvm", "off"):
        print("   clock_gettime pv=%-3s (%s): %s" % (mode, ",".join(cs[mode]) or "?", show(get(mode, "clock_ns"), " ns/call")))
    rc, txt = ratio(get("off", "clock_ns"), get("kvm", "clock_ns"))
    print("   clock_gettime cost off/kvm: %s" % txt)
    SUMMARY.append(("clock_gettime ns/call", fmt(stats(get("kvm", "clock_ns"))[0]), fmt(stats(get("off", "clock_ns"))[0]),
                    "off/kvm %s" % (fmt(rc) if rc else "n/a")))
    for mode in ("kvm", "off"):
        print("   lock (overcommitted) pv=%-3s ops/s: %s" % (mode, show(get(mode, "lock"))))
    r1, t1 = ratio(get("kvm", "lock"), get("off", "lock"))
    print("   lock (overcommitted) throughput kvm/off: %s   (aim: >= 1.5x)" % t1)
    SUMMARY.append(("lock ops/s, overcommitted", fmt(stats(get("kvm", "lock"))[0]), fmt(stats(get("off", "lock"))[0]),
                    "kvm/off %s" % (fmt(r1) if r1 else "n/a")))
    if get("kvm", "control") or get("off", "control"):
        for mode in ("kvm", "off"):
            print("   control (pinned, not overcommitted) pv=%-3s ops/s: %s" % (mode, show(get(mode, "control"))))
        r2, t2 = ratio(get("kvm", "control"), get("off", "control"))
        print("   control throughput kvm/off: %s" % t2)
        SUMMARY.append(("lock ops/s, control", fmt(stats(get("kvm", "control"))[0]), fmt(stats(get("off", "control"))[0]),
                        "kvm/off %s" % (fmt(r2) if r2 else "n/a")))
        if r1 and r2:
            print("   gain with overcommitment over the control's: %.2fx" % (r1 / r2))
            SUMMARY.append(("overcommitted ratio / control ratio", "-", "-", "%.2fx" % (r1 / r2)))
    for mode in ("kvm", "off"):
        print("   per boot pv=%-3s kicks %s  yields %s  preempted %s  tlb_flushes %s  pv_ipis %s  steal_ms %s" % (
            mode, fmt(stats(get(mode, "kicks"))[0]), fmt(stats(get(mode, "yields"))[0]),
            fmt(stats(get(mode, "preempted"))[0]), fmt(stats(get(mode, "tlb_flushes"))[0]),
            fmt(stats(get(mode, "pv_ipis"))[0]), fmt((stats(get(mode, "steal_us"))[0] or 0) / 1000)))
    SUMMARY.append(("lock boots: kicks/yields/preempted", "%s/%s/%s" % tuple(fmt(stats(get("kvm", k))[0]) for k in ("kicks", "yields", "preempted")),
                    "%s/%s/%s" % tuple(fmt(stats(get("off", k))[0]) for k in ("kicks", "yields", "preempted")), "per boot"))
    return 0 if r1 and rc else 1

def summary(manifest, parts):
    global SUMMARY
    import io, contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        if "exits" in parts: exits(manifest)
        if "lock" in parts: lock(manifest)
    print("   %-38s %-16s %-16s %s" % ("figure", "pv=kvm", "pv=off", "comparison"))
    for row in SUMMARY:
        print("   %-38s %-16s %-16s %s" % row)

cmd = sys.argv[1]
if cmd == "one": one(sys.argv[2])
elif cmd == "exits": sys.exit(exits(sys.argv[2]))
elif cmd == "lock": sys.exit(lock(sys.argv[2]))
elif cmd == "summary": summary(sys.argv[2], sys.argv[3:])
PY

MANIFEST="$WORK/manifest"
: >"$MANIFEST"
: >"$WORK/durations"

# run_one PART MODE KIND REP HOST_CPUS VCPUS LIMIT APPEND: a boot, its progress line, and its
# entry in the manifest.
run_one() {
    local part="$1" mode="$2" kind="$3" rep="$4" smp="$5" cpus="$6" limit="$7" append="$8" log line
    log="$WORK/$part-$kind-$mode-$rep.log"
    note "$part: $kind boot, pv=$mode, $cpus vCPUs on $smp host CPUs ($rep/$REPEATS)"
    boot "$log" "$smp" "$cpus" "$mode" "$limit" "$append"
    echo "$part $mode $kind $rep $log" >>"$MANIFEST"
    if line="$(python3 "$WORK/an.py" one "$log")"; then
        printf '   %-5s pv=%-3s run %d (%s s): %s\n' "$kind" "$mode" "$rep" "$(tail -n 1 "$WORK/durations")" "$line"
    else
        printf '   %-5s pv=%-3s run %d: %s (run-qemu status %s)\n' "$kind" "$mode" "$rep" "$line" "$BOOT_RC"
        cp "$log" "$OUTDIR/failed-$part-$kind-$mode-$rep.log" 2>/dev/null || true
        note "  serial log kept in $OUTDIR/failed-$part-$kind-$mode-$rep.log; its last lines:"
        serial_clean "$log" | grep -av '^[[:space:]]*$' | tail -n 12 | sed 's/^/    /' >&2 || true
        FAILED=1
    fi
}

part_exits() {
    local r mode base idle timer limit
    base="bench_pv_idle=0"
    idle="bench_pv_idle=$SECONDS_PHASE"
    timer="bench_pv_timer=$SECONDS_PHASE bench_pv_timer_threads=$TIMER_THREADS bench_pv_timer_us=$TIMER_US"
    limit=$((TIMEOUT > 0 ? TIMEOUT : 120 + 3 * SECONDS_PHASE))
    echo "== exits per second: 2 vCPUs on 2 host CPUs; boots base / idle ${SECONDS_PHASE} s / timer ${SECONDS_PHASE} s ($TIMER_THREADS threads, nanosleep ${TIMER_US} us)"
    for r in $(seq "$REPEATS"); do
        for mode in kvm off; do
            run_one exits "$mode" base "$r" 2 2 "$limit" "$base"
            run_one exits "$mode" idle "$r" 2 2 "$limit" "$idle"
            run_one exits "$mode" timer "$r" 2 2 "$limit" "$timer"
        done
    done
    python3 "$WORK/an.py" exits "$MANIFEST" || FAILED=1
}

part_lock() {
    local r mode append limit ctl=0
    [[ "$CONTROL" == 0 ]] || ctl="$CONTROL_THREADS"
    append="bench_pv_clock=$CLOCK_CALLS bench_pv_lock=$LOCK_SECONDS bench_pv_lock_rounds=$LOCK_ROUNDS"
    append+=" bench_pv_lock_threads=$LOCK_THREADS bench_pv_lock_mode=$LOCK_MODE bench_pv_lock_pages=$LOCK_PAGES bench_pv_lock_control=$ctl"
    limit=$((TIMEOUT > 0 ? TIMEOUT : 150 + 4 * LOCK_ROUNDS * LOCK_SECONDS))
    echo "== clock_gettime and lock-holder preemption: $LOCK_VCPUS vCPUs on $LOCK_HOST_CPUS host CPUs; clockbench $CLOCK_CALLS calls;"
    echo "   lockbench $LOCK_MODE, $LOCK_THREADS threads, $LOCK_ROUNDS x $LOCK_SECONDS s per boot$([[ "$ctl" == 0 ]] || echo ", each followed by a control of $ctl threads pinned to vCPUs 0..$((ctl - 1))")"
    for r in $(seq "$REPEATS"); do
        for mode in kvm off; do
            run_one lock "$mode" lock "$r" "$LOCK_HOST_CPUS" "$LOCK_VCPUS" "$limit" "$append"
        done
    done
    python3 "$WORK/an.py" lock "$MANIFEST" || FAILED=1
}

make_initramfs
note "ELF $ELF; kernel $KERNEL; initramfs $INITRD; repeats $REPEATS; parts ${PARTS[*]}"
echo "bench-pv: QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{ print $4 }') TCG$([[ "$ICOUNT" == 0 ]] || echo " -icount shift=0,sleep=off (single-threaded)"), host $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)$([[ "$QUICK" == 0 ]] || echo ", --quick")"
echo "   Vireo $(git -C "$VIREO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), kernel $(sed -n 's/^release=//p' "$(dirname "$KERNEL")/kernel.version" 2>/dev/null || echo '?')"
has_part exits && part_exits
has_part lock && part_lock
echo "== summary (means; pv=kvm vs pv=off measured in this run)"
python3 "$WORK/an.py" summary "$MANIFEST" "${PARTS[@]}"
echo "bench-pv: done in $(elapsed "$T_START") s ($(awk '{ s += $1 } END { printf "%.0f", s }' "$WORK/durations") s of emulator time over $(wc -l <"$WORK/durations") boots; load $(cut -d' ' -f1-3 /proc/loadavg))"
exit "$FAILED"
