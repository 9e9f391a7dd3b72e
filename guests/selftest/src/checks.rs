//! The checks. Each prints `selftest: <name> ok` or `selftest: <name> FAIL <detail>`.

use core::{
    arch::{asm, x86_64::__cpuid},
    fmt::Write,
    sync::atomic::Ordering,
};

use guest_abi::{
    cpuid as abi,
    hypercall::{self, errno, nr, Instruction, TEST_DEVICE_PORT, TEST_DEVICE_XOR, TEST_IRQ_PORT},
};

use crate::{
    console::Console,
    guest::{call, native},
    traps::{self, expect_fault, settle, BP_COUNT, IRQ_COUNT, TEST_VECTOR},
};

pub struct Tally {
    pub passed: u32,
    pub failed: u32,
}

impl Tally {
    pub const fn new() -> Self {
        Self { passed: 0, failed: 0 }
    }

    pub fn check(&mut self, name: &str, result: Result<(), &str>) {
        self.check_detail(name, result, format_args!(""));
    }

    /// [`Self::check`] with figures after the verdict (`selftest: <name> ok <detail>`), for
    /// the tests and the reader to see what was measured.
    pub fn check_detail(&mut self, name: &str, result: Result<(), &str>, detail: core::fmt::Arguments<'_>) {
        let sep = if detail.as_str() == Some("") { "" } else { " " };
        match result {
            Ok(()) => {
                self.passed += 1;
                let _ = writeln!(Console, "selftest: {name} ok{sep}{detail}");
            }
            Err(why) => {
                self.failed += 1;
                let _ = writeln!(Console, "selftest: {name} FAIL {why}{sep}{detail}");
            }
        }
    }
}

fn ensure(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond {
        Ok(())
    } else {
        Err(why)
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn outl(port: u16, v: u32) {
    // SAFETY: ports of Vireo's test devices (or unassigned ports): no side effects on us.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

pub fn rdmsr(msr: u32) -> Result<u64, (u8, u64)> {
    let (lo, hi): (u32, u32);
    expect_fault(2);
    // SAFETY: a faulting RDMSR is recovered by the trap handler (2-byte instruction).
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack)) };
    match settle() {
        Some(fault) => Err(fault),
        None => Ok(((hi as u64) << 32) | lo as u64),
    }
}

pub fn wrmsr(msr: u32, v: u64) -> Option<(u8, u64)> {
    expect_fault(2);
    // SAFETY: as in `rdmsr`.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) };
    settle()
}

fn other(insn: Instruction) -> Instruction {
    match insn {
        Instruction::Vmcall => Instruction::Vmmcall,
        Instruction::Vmmcall => Instruction::Vmcall,
    }
}

/// The words [`probe_untouched`] and [`dirty_ram`] look at in each 2 MiB chunk.
const PROBE_OFFSETS: [u64; 3] = [0, 0x1000, (2 << 20) - 8];

/// The 2 MiB chunks from 16 MiB (above the image and its data) to 4 MiB below the top of RAM
/// (the stack).
fn probed_chunks(ram: u64) -> impl Iterator<Item = u64> {
    (8u64..).map(|i| i << 21).take_while(move |addr| addr + (4 << 20) <= ram)
}

/// Reads three words of every chunk this guest never wrote; returns (chunks, non-zero words).
pub fn probe_untouched(ram: u64) -> (u64, u64) {
    let (mut chunks, mut nonzero) = (0u64, 0u64);
    for addr in probed_chunks(ram) {
        for offset in PROBE_OFFSETS {
            // SAFETY: the guest runs identity-mapped over all of its RAM (Vireo's boot
            // tables cover 4 GiB); `addr + offset` is below `ram - 4 MiB`.
            let v = unsafe { core::ptr::read_volatile((addr + offset) as *const u64) };
            nonzero += (v != 0) as u64;
        }
        chunks += 1;
    }
    (chunks, nonzero)
}

/// Writes a marker into the words [`probe_untouched`] reads, in every chunk; returns the
/// number of chunks (`mode=reuse`: the next boot must see none of it).
pub fn dirty_ram(ram: u64) -> u64 {
    let mut chunks = 0;
    for addr in probed_chunks(ram) {
        for offset in PROBE_OFFSETS {
            // SAFETY: as in `probe_untouched`; nothing of this guest lives there.
            unsafe { core::ptr::write_volatile((addr + offset) as *mut u64, 0x5649_5245_4f4c_4421) };
        }
        chunks += 1;
    }
    chunks
}

/// Runs every check (the SMP ones too when `cpus` > 1); returns the number that failed.
pub fn run_all(ram: u64, cpus: usize) -> u32 {
    let mut t = Tally::new();
    let _ = writeln!(Console, "selftest: start ram={ram:#x}");

    // RAM nobody wrote reads as zeros: Vireo populates it lazily, per 2 MiB, zeroing each
    // chunk at the first touch (this one), never exposing host data or an earlier VM's.
    t.check("ram_untouched_reads_zero", {
        let (chunks, nonzero) = probe_untouched(ram);
        let _ = writeln!(Console, "selftest: ram_untouched chunks={chunks} nonzero_words={nonzero}");
        ensure(nonzero == 0, "untouched RAM is not zero")
    });

    t.check(
        "cpuid_hypervisor_bit",
        ensure(__cpuid(1).ecx & abi::HYPERVISOR_PRESENT_ECX_BIT != 0, "CPUID.1:ECX[31] clear"),
    );
    t.check("cpuid_signature", {
        let r = __cpuid(abi::LEAF_SIGNATURE);
        ensure(abi::is_vireo(r.ebx, r.ecx, r.edx), "signature mismatch")
            .and(ensure(r.eax >= abi::LEAF_VERSION, "max leaf too small"))
            .and(ensure(__cpuid(abi::LEAF_VERSION).eax == guest_abi::ABI_VERSION, "ABI version mismatch"))
    });
    // Test guests get no PMU unless their line says `pmu=on` (then `mode=pmu` checks it).
    crate::pmu::hidden(&mut t);
    t.check(
        "cpuid_virtualization_hidden",
        ensure(__cpuid(1).ecx & (1 << 5) == 0, "VMX visible")
            .and(ensure(__cpuid(0x8000_0001).ecx & (1 << 2) == 0, "SVM visible")),
    );

    t.check("hypercall_ping", {
        let mut ok = call(nr::PING, [41, 0, 0, 0]) == 42;
        for i in 0..1000u64 {
            ok &= call(nr::PING, [i, 0, 0, 0]) == i as i64 + 1;
        }
        ensure(ok, "PING(x) != x + 1")
    });
    t.check("hypercall_other_instruction", {
        // SAFETY: the non-native instruction raises #UD, which Vireo turns into the call.
        let r = unsafe { hypercall::call(other(native()), nr::PING, [99, 0, 0, 0]) };
        ensure(r == 100, "the other vendor's instruction was not accepted")
    });
    t.check("hypercall_version", ensure(call(nr::VERSION, [0; 4]) == guest_abi::ABI_VERSION as i64, "VERSION"));
    // KICK_CPU (5) is a KVM number: -ENOSYS unless the VM offers the KVM interface
    // (`pv=kvm`, whose checks are `mode=pv`'s); 13 is no call in either.
    let kvm_pv = __cpuid(abi::LEAF_VERSION).ebx & abi::features::KVM_PV != 0;
    t.check(
        "hypercall_unknown_number",
        ensure(call(hypercall::BASE + 0xFFFF, [0; 4]) == -errno::ENOSYS, "unknown Vireo number")
            .and(ensure(kvm_pv || call(5, [0; 4]) == -errno::ENOSYS, "KVM number"))
            .and(ensure(call(13, [0; 4]) == -errno::ENOSYS, "unknown KVM number"))
            .and(ensure(call(u64::MAX, [u64::MAX; 4]) == -errno::ENOSYS, "all-ones number")),
    );
    t.check(
        "hypercall_bad_pointer",
        ensure(call(nr::CONSOLE_WRITE, [ram + 0x1000, 16, 0, 0]) == -errno::EFAULT, "buffer outside RAM")
            .and(ensure(call(nr::CONSOLE_WRITE, [u64::MAX - 4, 16, 0, 0]) == -errno::EFAULT, "wrapping buffer"))
            .and(ensure(call(nr::CONSOLE_WRITE, [0x1000, 1 << 20, 0, 0]) == -errno::E2BIG, "oversized buffer")),
    );
    t.check("hypercall_console", {
        let msg = b"selftest: console line written by hypercall\n";
        ensure(
            call(nr::CONSOLE_WRITE, [msg.as_ptr() as u64, msg.len() as u64, 0, 0]) == msg.len() as i64,
            "short write",
        )
    });

    t.check("port_io_test_device", {
        let mut ok = true;
        for v in [0u32, 1, 0xDEAD_BEEF, 0xFFFF_FFFF] {
            outl(TEST_DEVICE_PORT, v);
            ok &= inl(TEST_DEVICE_PORT) == v ^ TEST_DEVICE_XOR;
        }
        ensure(ok, "test device did not round-trip")
    });
    t.check("port_io_unknown_reads_ones", {
        let (b, w): (u8, u16);
        // SAFETY: an unassigned port.
        unsafe {
            asm!("in al, dx", in("dx") 0x1234u16, out("al") b, options(nomem, nostack));
            asm!("in ax, dx", in("dx") 0x1234u16, out("ax") w, options(nomem, nostack));
        }
        outl(0x1234, 0);
        ensure(b == 0xFF && w == 0xFFFF && inl(0x1234) == u32::MAX, "unknown port did not read all ones")
    });

    t.check(
        "msr_unknown_raises_gp",
        ensure(rdmsr(0x1234_5678) == Err((13, 0)), "RDMSR of an unknown MSR")
            .and(ensure(wrmsr(0x1234_5678, 1) == Some((13, 0)), "WRMSR of an unknown MSR"))
            .and(ensure(rdmsr(0x3A).is_err(), "IA32_FEATURE_CONTROL should not exist for the guest")),
    );
    t.check("msr_efer_and_pat", {
        const EFER: u32 = 0xC000_0080;
        let efer = rdmsr(EFER).unwrap_or(0);
        ensure(efer & 0x500 == 0x500, "EFER.LME|LMA not set")
            .and(ensure(wrmsr(EFER, efer | (1 << 12)) == Some((13, 0)), "EFER.SVME accepted"))
            .and(ensure(wrmsr(EFER, efer).is_none(), "rewriting EFER faulted"))
            .and(ensure(wrmsr(0x277, 0x0007_0406_0007_0406).is_none(), "PAT write"))
            .and(ensure(wrmsr(0x277, 0x02).is_some(), "invalid PAT type accepted"))
            .and(ensure(rdmsr(0x277) == Ok(0x0007_0406_0007_0406), "PAT read back"))
    });

    t.check("access_outside_memory", {
        const HOLE: u64 = 0xC000_0000;
        // SAFETY: guest-physical space with no RAM: Vireo emulates the access.
        let (d, b) = unsafe {
            core::ptr::write_volatile(HOLE as *mut u32, 0x1234_5678);
            (core::ptr::read_volatile(HOLE as *const u32), core::ptr::read_volatile((HOLE + 0x10) as *const u8))
        };
        ensure(d == u32::MAX && b == 0xFF, "unassigned memory did not read all ones")
    });

    t.check("guest_exceptions", {
        expect_fault(2);
        // SAFETY: #UD recovered by our own handler.
        unsafe { asm!("ud2", options(nomem, nostack)) };
        let ud = settle();
        expect_fault(2);
        // SAFETY: #DE recovered (div ecx is 2 bytes).
        unsafe { asm!("div ecx", in("ecx") 0, inout("eax") 1 => _, inout("edx") 0 => _, options(nomem, nostack)) };
        let de = settle();
        let before = BP_COUNT.load(Ordering::SeqCst);
        // SAFETY: #BP returns after INT3.
        unsafe { asm!("int3", options(nomem, nostack)) };
        let _ = traps::take();
        ensure(ud == Some((6, 0)), "#UD not delivered to the guest")
            .and(ensure(de == Some((0, 0)), "#DE not delivered"))
            .and(ensure(BP_COUNT.load(Ordering::SeqCst) == before + 1, "#BP not delivered"))
    });

    t.check("hlt_with_interrupt_pending", {
        let before = IRQ_COUNT.load(Ordering::SeqCst);
        // SAFETY: the test interrupt arrives while IF=0, then STI;HLT takes it.
        unsafe {
            asm!("cli");
            outl(TEST_IRQ_PORT, TEST_VECTOR as u32);
            asm!("sti", "hlt", "nop", "cli");
        }
        ensure(IRQ_COUNT.load(Ordering::SeqCst) == before + 1, "pending interrupt not delivered at HLT")
    });
    t.check("hlt_without_interrupt_pending", {
        let before = IRQ_COUNT.load(Ordering::SeqCst);
        let delay_units = 200u64;
        let t0 = rdtsc();
        // SAFETY: the interrupt fires only after the delay; HLT must wait for it.
        unsafe {
            asm!("cli");
            outl(TEST_IRQ_PORT, TEST_VECTOR as u32 | ((delay_units as u32) << 8));
            asm!("sti", "hlt", "nop", "cli");
        }
        let waited = rdtsc() - t0;
        ensure(IRQ_COUNT.load(Ordering::SeqCst) == before + 1, "timer interrupt did not wake HLT").and(ensure(
            waited >= delay_units * hypercall::TEST_IRQ_DELAY_UNIT,
            "HLT returned before the interrupt was due",
        ))
    });

    t.check("sse_state_survives_exits", {
        let pattern: [u64; 2] = [0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210];
        let mut back = [0u64; 2];
        // SAFETY: SSE is enabled (CR4.OSFXSR) by Vireo's starting state; CPUID exits.
        unsafe {
            asm!(
                "movdqu xmm3, [{src}]",
                "mov {save}, rbx",
                "cpuid",
                "mov rbx, {save}",
                "out 0x80, al",
                "movdqu [{dst}], xmm3",
                src = in(reg) pattern.as_ptr(),
                dst = in(reg) back.as_mut_ptr(),
                save = out(reg) _,
                inout("eax") 0 => _, out("ecx") _, out("edx") _, out("xmm3") _,
                options(nostack)
            )
        };
        ensure(back == pattern, "XMM3 changed across exits")
    });

    t.check("xsetbv", {
        if __cpuid(1).ecx & (1 << 26) == 0 {
            let _ = writeln!(Console, "selftest: xsetbv not applicable: this CPU has no XSAVE");
            Ok(())
        } else {
            // SAFETY: enabling CR4.OSXSAVE (CPUID says XSAVE exists), then XSETBV, whose
            // invalid forms fault and are recovered (3-byte instruction).
            unsafe {
                asm!("mov rax, cr4", "bts rax, 18", "mov cr4, rax", out("rax") _);
                expect_fault(3);
                asm!("xsetbv", in("ecx") 0, in("eax") 3, in("edx") 0);
                let good = settle();
                expect_fault(3);
                asm!("xsetbv", in("ecx") 0, in("eax") 2, in("edx") 0);
                let bad = settle();
                ensure(good.is_none(), "XCR0 = x87|SSE refused")
                    .and(ensure(bad == Some((13, 0)), "XCR0 without x87 accepted"))
                    .and(ensure(__cpuid(1).ecx & (1 << 27) != 0, "CPUID.OSXSAVE does not follow CR4"))
            }
        }
    });

    t.check("exit_statistics", {
        let mut buf = [0u64; 2 * 32];
        let n = call(nr::EXIT_STATS, [buf.as_mut_ptr() as u64, core::mem::size_of_val(&buf) as u64, 0, 0]);
        ensure(n >= 19, "EXIT_STATS returned too few classes")
            .and(ensure(buf[0] > 0, "no CPUID exits counted"))
            .and(ensure(buf[4 * 2] >= 1000, "fewer hypercalls counted than made"))
    });

    crate::pv::hypercall_page(&mut t, cpus);

    crate::smp::run(&mut t, cpus);

    let _ = writeln!(Console, "selftest: {} passed, {} failed", t.passed, t.failed);
    t.failed
}

/// `n` PING round trips, timed.
pub fn bench(n: u64) {
    let insn = native();
    let t0 = rdtsc();
    for i in 0..n {
        // SAFETY: PING has no side effects.
        core::hint::black_box(unsafe { hypercall::call(insn, nr::PING, [i, 0, 0, 0]) });
    }
    let cycles = rdtsc() - t0;
    let _ =
        writeln!(Console, "selftest: bench hypercalls={} tsc_total={} tsc_per_call={}", n, cycles, cycles / n.max(1));
}

/// A xorshift64 generator (the guest has no other randomness it needs).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` random hostile operations: wild MSRs, ports, hypercall numbers and pointers,
/// accesses to unassigned memory, the paravirtual MSRs given areas outside RAM. Each must
/// get its architectural answer; Vireo must survive all of them. Returns the number of
/// wrong answers. With `pv=kvm` KVM's own numbers (1..=12) do things, so only unknown KVM
/// numbers are tried then (`mode=pv` checks the known ones).
pub fn hostile(n: u64, ram: u64) -> u32 {
    use guest_abi::{hypercall::scope, kvm};
    let mut rng = Rng(rdtsc() | 1);
    let mut wrong = 0u32;
    let mut faults = 0u64;
    let kvm_pv = __cpuid(abi::LEAF_VERSION).ebx & abi::features::KVM_PV != 0;
    // Ports that would reset or power off the VM, or flood the console.
    let spared = |p: u16| matches!(p, 0xE9 | 0x64 | 0x92 | 0xCF9 | 0x604 | 0xB004 | 0x4004);
    // MSRs that name a guest area: an enabled area outside RAM must be #GP (with pv=off the
    // KVM ones do not exist: #GP too). Areas inside RAM are never tried: Vireo would write
    // them, over this guest's code or data.
    let area_msrs = [
        hypercall::page::MSR,
        kvm::msr::SYSTEM_TIME_NEW,
        kvm::msr::STEAL_TIME,
        kvm::msr::PV_EOI_EN,
        kvm::msr::WALL_CLOCK_NEW,
    ];
    for _ in 0..n {
        let r = rng.next();
        match r % 7 {
            0 => {
                if rdmsr(rng.next() as u32).is_err() {
                    faults += 1;
                }
            }
            1 => {
                // Random MSR numbers; values random too.
                if wrmsr(rng.next() as u32 | 0x4000_0000, rng.next()).is_some() {
                    faults += 1;
                }
            }
            2 => {
                let port = rng.next() as u16;
                if !spared(port) {
                    let v = rng.next() as u32;
                    // SAFETY: any port: Vireo decides what it does.
                    unsafe {
                        match r >> 8 & 3 {
                            0 => asm!("out dx, al", in("dx") port, in("al") v as u8, options(nomem, nostack)),
                            1 => asm!("out dx, ax", in("dx") port, in("ax") v as u16, options(nomem, nostack)),
                            _ => asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)),
                        }
                    }
                }
            }
            3 => {
                let port = rng.next() as u16;
                if !spared(port) && port != TEST_DEVICE_PORT {
                    let v: u32;
                    // SAFETY: as above.
                    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
                    wrong += (v != u32::MAX) as u32;
                }
            }
            4 => {
                // Wild numbers and pointers outside RAM: -ENOSYS / -EFAULT / -E2BIG.
                let bad_ptr = ram + (rng.next() % (u64::MAX - ram));
                let len = rng.next() % 8192;
                let bad_buffer: &[i64] = &[-errno::EFAULT, -errno::E2BIG, -errno::EINVAL];
                let (num, args, expect): (u64, [u64; 4], &[i64]) = match r >> 8 & 7 {
                    0 => (rng.next() | (1 << 40), [bad_ptr, len, rng.next(), rng.next()], &[-errno::ENOSYS]),
                    1 => (nr::CONSOLE_WRITE, [bad_ptr, len, rng.next(), rng.next()], &[-errno::EFAULT, -errno::E2BIG]),
                    2 => (nr::EXIT_STATS, [bad_ptr, len, rng.next(), rng.next()], &[-errno::EFAULT, -errno::E2BIG]),
                    3 if kvm_pv => (13 + rng.next() % 900, [rng.next(); 4], &[-errno::ENOSYS]),
                    3 => (1 + rng.next() % 12, [bad_ptr, len, rng.next(), rng.next()], &[-errno::ENOSYS]),
                    4 | 5 => {
                        // STATS into a buffer outside RAM, any scope, any flags.
                        let s = [scope::SELF, scope::VM, 0, rng.next()][(r >> 12 & 3) as usize];
                        (nr::STATS, [bad_ptr, len, s, rng.next() & 3], bad_buffer)
                    }
                    // A scope that is no vCPU (bit 63 clear: never SELF or VM).
                    6 => (nr::STATS_MARK, [(rng.next() | 1 << 40) & !(1 << 63), 0, 0, 0], &[-errno::EINVAL]),
                    _ => (nr::STEAL_TIME, [(rng.next() | 1 << 40) & !(1 << 63), 0, 0, 0], &[-errno::EINVAL]),
                };
                let got = call(num, args);
                wrong += (!expect.contains(&got)) as u32;
            }
            5 => {
                let msr = area_msrs[(r >> 8) as usize % area_msrs.len()];
                // Beyond RAM (up to 2^46), page-aligned, enabled; bit 0 is ignored by the wall
                // clock, whose area is then beyond RAM all the same.
                let gpa = (ram + 0x1000 + rng.next() % (1 << 46)) & !0xFFF;
                let fault = wrmsr(msr, gpa | 1);
                faults += fault.is_some() as u64;
                wrong += (fault != Some((13, 0))) as u32;
            }
            _ => {
                let gpa = (ram + 0x1000 + (rng.next() % (0xF000_0000 - ram))) & !7;
                // SAFETY: guest-physical space with no RAM (the boot tables map 4 GiB).
                let v = unsafe { core::ptr::read_volatile(gpa as *const u64) };
                wrong += (v != u64::MAX) as u32;
            }
        }
    }
    let _ = writeln!(Console, "selftest: hostile operations={n} faults={faults} wrong={wrong}");
    wrong
}
