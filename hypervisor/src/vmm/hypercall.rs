//! Vireo's hypercalls (`guest_abi::hypercall`): argument checks and results. Guest buffers
//! are reached only through `GuestMemory`'s checked helpers, so a bad pointer is -EFAULT,
//! never a fault in Vireo.

use guest_abi::{
    hypercall::{errno, nr, scope, stats_flags, CONSOLE_WRITE_MAX},
    stats::{ExitRecord, StatsHeader, HEADER_SIZE, KINDS_V1, LAYOUT_VERSION, MAGIC, RECORD_SIZE},
};

use super::{
    exit::EXIT_KINDS,
    guest_mem::GuestMemory,
    stats::{ExitStats, VcpuCounters},
};

/// What the VM should do after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Return this value in RAX and continue after the instruction.
    Return(i64),
    /// The guest asked to end its VM with this status.
    Exit(u64),
    /// The guest asked for its VM to be reset (built again from its module).
    Reset,
}

/// Everything a hypercall may touch.
pub struct Context<'a> {
    pub mem: &'a GuestMemory,
    /// Every vCPU's figures (index = vCPU), and the caller's index.
    pub counters: &'a [VcpuCounters],
    pub vcpu: usize,
    /// The VM's start and now, in TSC ticks; the TSC rate.
    pub start_tsc: u64,
    pub now_tsc: u64,
    pub tsc_khz: u64,
    /// The feature bits of CPUID `LEAF_VERSION` for this VM.
    pub features: u32,
    /// Where CONSOLE_WRITE bytes go.
    pub console: &'a mut dyn FnMut(&[u8]),
}

impl Context<'_> {
    /// The vCPUs a scope covers, as an index range.
    fn scope(&self, s: u64) -> Option<core::ops::Range<usize>> {
        match s {
            scope::SELF => Some(self.vcpu..self.vcpu + 1),
            scope::VM => Some(0..self.counters.len()),
            n if n < self.counters.len() as u64 => Some(n as usize..n as usize + 1),
            _ => None,
        }
    }

    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        if self.tsc_khz == 0 {
            return 0;
        }
        (ticks as u128 * 1_000_000 / self.tsc_khz as u128) as u64
    }
}

/// The calls that need nothing but their arguments (no guest memory, statistics, time or
/// console): answered as [`handle`] answers them, without a [`Context`] to build; `None` for
/// every other call (and from CPL > 0, which `handle` refuses).
#[inline]
pub fn handle_simple(number: u64, args: [u64; 4], cpl: u8) -> Option<Outcome> {
    if cpl != 0 {
        return None;
    }
    match number {
        nr::PING => Some(Outcome::Return(args[0].wrapping_add(1) as i64)),
        nr::VERSION => Some(Outcome::Return(guest_abi::ABI_VERSION as i64)),
        _ => None,
    }
}

/// Handles hypercall `number` with `args` issued at privilege level `cpl`.
pub fn handle(number: u64, args: [u64; 4], cpl: u8, cx: &mut Context<'_>) -> Outcome {
    use Outcome::Return;
    if cpl != 0 {
        return Return(-errno::EPERM);
    }
    match number {
        nr::PING => Return(args[0].wrapping_add(1) as i64),
        nr::VERSION => Return(guest_abi::ABI_VERSION as i64),
        nr::CONSOLE_WRITE => {
            let (gpa, len) = (args[0], args[1]);
            if len > CONSOLE_WRITE_MAX {
                return Return(-errno::E2BIG);
            }
            let mut buf = [0u8; CONSOLE_WRITE_MAX as usize];
            let buf = &mut buf[..len as usize];
            match cx.mem.read(gpa, buf) {
                Ok(()) => {
                    (cx.console)(buf);
                    Return(len as i64)
                }
                Err(_) => Return(-errno::EFAULT),
            }
        }
        nr::VM_EXIT => Outcome::Exit(args[0]),
        nr::VM_RESET => Outcome::Reset,
        nr::EXIT_STATS => {
            // Version 1: bare records of the calling vCPU, as many kinds as fit (at least
            // the 19 of ABI 0.1-0.3, at most all); returns their number.
            let (gpa, len) = (args[0], args[1]);
            if len < (KINDS_V1 * RECORD_SIZE) as u64 {
                return Return(-errno::E2BIG);
            }
            let n = ((len / RECORD_SIZE as u64) as usize).min(EXIT_KINDS);
            let stats = cx.counters[cx.vcpu].exits.snapshot();
            match write_records(cx.mem, gpa, &stats, n) {
                Ok(()) => Return(n as i64),
                Err(()) => Return(-errno::EFAULT),
            }
        }
        nr::FEATURES => Return(cx.features as i64),
        nr::STATS => Return(stats(cx, args[0], args[1], args[2], args[3])),
        nr::STATS_MARK => match cx.scope(args[0]) {
            Some(range) => {
                for c in &cx.counters[range] {
                    c.set_mark(cx.now_tsc);
                }
                Return(0)
            }
            None => Return(-errno::EINVAL),
        },
        nr::STEAL_TIME => match cx.scope(args[0]) {
            Some(range) => {
                let ticks: u64 =
                    cx.counters[range].iter().map(|c| c.steal.load(core::sync::atomic::Ordering::Relaxed)).sum();
                Return(cx.ticks_to_ns(ticks) as i64)
            }
            None => Return(-errno::EINVAL),
        },
        nr::VCPU_INFO => Return((cx.vcpu as i64 & 0xFFFF) | ((cx.counters.len() as i64 & 0xFFFF) << 16)),
        _ => Return(-errno::ENOSYS),
    }
}

/// [`nr::STATS`]: header and as many records as fit; returns the bytes written.
fn stats(cx: &Context<'_>, gpa: u64, len: u64, scope: u64, flags: u64) -> i64 {
    use core::sync::atomic::Ordering::Relaxed;
    if flags & !stats_flags::ALL != 0 {
        return -errno::EINVAL;
    }
    let Some(range) = cx.scope(scope) else { return -errno::EINVAL };
    if len < HEADER_SIZE as u64 {
        return -errno::E2BIG;
    }
    let since_mark = flags & stats_flags::SINCE_MARK != 0;
    let mut sum = ExitStats::new();
    let mut steal = 0u64;
    let mut since_tsc = u64::MAX;
    for c in &cx.counters[range.clone()] {
        let now = c.exits.snapshot();
        let mark_tsc = c.mark_tsc.load(Relaxed);
        if since_mark && mark_tsc != 0 {
            sum.add(&now.since(&c.mark.snapshot()));
            steal += c.steal.load(Relaxed).saturating_sub(c.mark_steal.load(Relaxed));
            since_tsc = since_tsc.min(mark_tsc);
        } else {
            sum.add(&now);
            steal += c.steal.load(Relaxed);
            since_tsc = since_tsc.min(cx.start_tsc);
        }
    }
    let records = (((len - HEADER_SIZE as u64) / RECORD_SIZE as u64) as usize).min(EXIT_KINDS);
    let header = StatsHeader {
        magic: MAGIC,
        version: LAYOUT_VERSION,
        kinds: EXIT_KINDS as u32,
        vcpus: range.len() as u32,
        tsc_khz: cx.tsc_khz,
        now_tsc: cx.now_tsc,
        since_tsc,
        steal_ns: cx.ticks_to_ns(steal),
    };
    let total = HEADER_SIZE + records * RECORD_SIZE;
    // Check the whole buffer first: a bad one gets nothing written.
    if !cx.mem.contains(gpa, total as u64) {
        return -errno::EFAULT;
    }
    if cx.mem.write(gpa, &header.to_bytes()).is_err()
        || write_records(cx.mem, gpa + HEADER_SIZE as u64, &sum, records).is_err()
    {
        return -errno::EFAULT;
    }
    total as i64
}

/// Writes the first `n` classes of `stats` as records at `gpa`.
fn write_records(mem: &GuestMemory, gpa: u64, stats: &ExitStats, n: usize) -> Result<(), ()> {
    let mut bytes = [0u8; EXIT_KINDS * RECORD_SIZE];
    for (i, c) in stats.classes().iter().enumerate().take(n) {
        let r = ExitRecord { count: c.count, cycles: c.cycles };
        bytes[i * RECORD_SIZE..(i + 1) * RECORD_SIZE].copy_from_slice(&r.to_bytes());
    }
    mem.write(gpa, &bytes[..n * RECORD_SIZE]).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::{mm::frame::FrameAllocator, vmm::exit::ExitKind};

    fn with_cx<R>(vcpus: usize, f: impl FnOnce(&mut Context<'_>) -> R) -> R {
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let counters: Vec<VcpuCounters> = (0..vcpus).map(|_| VcpuCounters::default()).collect();
        let mut out = |_: &[u8]| {};
        let mut cx = Context {
            mem: &mem,
            counters: &counters,
            vcpu: 1.min(vcpus - 1),
            start_tsc: 1000,
            now_tsc: 5000,
            tsc_khz: 1_000_000,
            features: 0xF,
            console: &mut out,
        };
        f(&mut cx)
    }

    fn read_stats(cx: &Context<'_>, gpa: u64) -> (StatsHeader, Vec<ExitRecord>) {
        let mut h = [0u8; HEADER_SIZE];
        cx.mem.read(gpa, &mut h).unwrap();
        let h = StatsHeader::from_bytes(&h);
        let mut recs = Vec::new();
        for i in 0..h.kinds as u64 {
            let mut r = [0u8; RECORD_SIZE];
            cx.mem.read(gpa + HEADER_SIZE as u64 + i * RECORD_SIZE as u64, &mut r).unwrap();
            recs.push(ExitRecord::from_bytes(&r));
        }
        (h, recs)
    }

    #[test]
    fn simple_calls_answer_as_the_full_handler() {
        with_cx(1, |cx| {
            for number in [nr::PING, nr::VERSION, nr::CONSOLE_WRITE, nr::STATS, 0x1234] {
                for cpl in [0, 3] {
                    let args = [41, 0, 0, 0];
                    match handle_simple(number, args, cpl) {
                        Some(out) => assert_eq!(out, handle(number, args, cpl, cx), "{number:#x} cpl {cpl}"),
                        None => assert!(cpl != 0 || !matches!(number, nr::PING | nr::VERSION)),
                    }
                }
            }
        });
    }

    #[test]
    fn privilege_and_unknown_numbers() {
        with_cx(1, |cx| {
            assert_eq!(handle(nr::PING, [1, 0, 0, 0], 3, cx), Outcome::Return(-errno::EPERM));
            assert_eq!(handle(nr::PING, [1, 0, 0, 0], 0, cx), Outcome::Return(2));
            assert_eq!(handle(nr::LAST + 1, [0; 4], 0, cx), Outcome::Return(-errno::ENOSYS));
            assert_eq!(handle(nr::VERSION, [0; 4], 0, cx), Outcome::Return(4));
            assert_eq!(handle(nr::VM_RESET, [0; 4], 0, cx), Outcome::Reset);
            assert_eq!(handle(nr::VM_RESET, [0; 4], 3, cx), Outcome::Return(-errno::EPERM));
            assert_eq!(handle(nr::FEATURES, [0; 4], 0, cx), Outcome::Return(0xF));
        });
    }

    #[test]
    fn stats_scopes_marks_and_errors() {
        with_cx(2, |cx| {
            cx.counters[0].exits.record(&ExitKind::Cpuid, 10);
            cx.counters[1].exits.record(&ExitKind::Cpuid, 20);
            cx.counters[1].exits.record(&ExitKind::Hlt, 5);
            cx.counters[1].steal.store(3_000, core::sync::atomic::Ordering::Relaxed);
            let full = (HEADER_SIZE + EXIT_KINDS * RECORD_SIZE) as u64;
            // The whole VM.
            assert_eq!(handle(nr::STATS, [0x1000, full, scope::VM, 0], 0, cx), Outcome::Return(full as i64));
            let (h, r) = read_stats(cx, 0x1000);
            assert_eq!((h.magic, h.vcpus, h.kinds as usize, h.since_tsc), (MAGIC, 2, EXIT_KINDS, 1000));
            assert_eq!(r[ExitKind::Cpuid.index()], ExitRecord { count: 2, cycles: 30 });
            assert_eq!(h.steal_ns, 3_000, "1 GHz: a tick is a nanosecond");
            // Self (vCPU 1) and vCPU 0 by index.
            handle(nr::STATS, [0x1000, full, scope::SELF, 0], 0, cx);
            assert_eq!(read_stats(cx, 0x1000).1[ExitKind::Hlt.index()].count, 1);
            handle(nr::STATS, [0x1000, full, 0, 0], 0, cx);
            assert_eq!(read_stats(cx, 0x1000).1[ExitKind::Hlt.index()].count, 0);
            // Since a mark.
            assert_eq!(handle(nr::STATS_MARK, [scope::VM, 0, 0, 0], 0, cx), Outcome::Return(0));
            cx.counters[0].exits.record(&ExitKind::Cpuid, 4);
            handle(nr::STATS, [0x1000, full, scope::VM, stats_flags::SINCE_MARK], 0, cx);
            let (h, r) = read_stats(cx, 0x1000);
            assert_eq!(r[ExitKind::Cpuid.index()], ExitRecord { count: 1, cycles: 4 });
            assert_eq!((h.since_tsc, h.steal_ns), (5000, 0));
            // A short buffer gets the records that fit.
            let short = (HEADER_SIZE + 2 * RECORD_SIZE) as u64;
            assert_eq!(handle(nr::STATS, [0x2000, short, scope::VM, 0], 0, cx), Outcome::Return(short as i64));
            // Errors.
            let e = |cx: &mut Context<'_>, a: [u64; 4]| handle(nr::STATS, a, 0, cx);
            assert_eq!(e(cx, [0x1000, 47, scope::VM, 0]), Outcome::Return(-errno::E2BIG));
            assert_eq!(e(cx, [0x1000, full, 2, 0]), Outcome::Return(-errno::EINVAL), "no vCPU 2");
            assert_eq!(e(cx, [0x1000, full, scope::VM, 2]), Outcome::Return(-errno::EINVAL), "unknown flag");
            let end = cx.mem.size() - 16;
            assert_eq!(e(cx, [end, full, scope::VM, 0]), Outcome::Return(-errno::EFAULT), "straddles the end of RAM");
            assert_eq!(e(cx, [0xFEE0_0000, full, scope::VM, 0]), Outcome::Return(-errno::EFAULT), "MMIO");
            assert_eq!(handle(nr::STATS_MARK, [7, 0, 0, 0], 0, cx), Outcome::Return(-errno::EINVAL));
        });
    }

    #[test]
    fn steal_and_vcpu_info() {
        with_cx(2, |cx| {
            cx.counters[0].steal.store(2_000, core::sync::atomic::Ordering::Relaxed);
            cx.counters[1].steal.store(500, core::sync::atomic::Ordering::Relaxed);
            assert_eq!(handle(nr::STEAL_TIME, [scope::VM, 0, 0, 0], 0, cx), Outcome::Return(2_500));
            assert_eq!(handle(nr::STEAL_TIME, [scope::SELF, 0, 0, 0], 0, cx), Outcome::Return(500));
            assert_eq!(handle(nr::STEAL_TIME, [9, 0, 0, 0], 0, cx), Outcome::Return(-errno::EINVAL));
            assert_eq!(handle(nr::VCPU_INFO, [0; 4], 0, cx), Outcome::Return(1 | (2 << 16)));
        });
    }

    #[test]
    fn version1_exit_stats_still_work() {
        with_cx(1, |cx| {
            cx.counters[0].exits.record(&ExitKind::Pause, 9);
            let n = (EXIT_KINDS * RECORD_SIZE) as u64;
            assert_eq!(handle(nr::EXIT_STATS, [0x3000, n, 0, 0], 0, cx), Outcome::Return(EXIT_KINDS as i64));
            assert_eq!(cx.mem.read_u64(0x3000 + ExitKind::Pause.index() as u64 * 16).unwrap(), 1);
            // A buffer sized for ABI 0.1-0.3's 19 kinds still works (and gets 19 records).
            let v1 = (KINDS_V1 * RECORD_SIZE) as u64;
            assert_eq!(handle(nr::EXIT_STATS, [0x3000, n - 1, 0, 0], 0, cx), Outcome::Return(KINDS_V1 as i64));
            assert_eq!(handle(nr::EXIT_STATS, [0x3000, v1, 0, 0], 0, cx), Outcome::Return(KINDS_V1 as i64));
            assert_eq!(handle(nr::EXIT_STATS, [0x3000, v1 - 1, 0, 0], 0, cx), Outcome::Return(-errno::E2BIG));
        });
    }
}
