//! Checks of ABI version 2 and of the KVM paravirtual interface.
//!
//! - [`hypercall_page`] (every run): the hypercall page named by CPUID 0x4000_0102, calls
//!   made only through its stubs (so the guest never picks VMCALL or VMMCALL itself), the
//!   statistics calls and their mark, steal time, and version 1's EXIT_STATS beside them.
//! - [`run`] (`mode=pv`, with `pv=kvm` or `pv=off` on the VM line): the page checks, then
//!   every new MSR and hypercall given bad values (areas beyond, straddling or outside RAM,
//!   reserved bits, bad buffers, scopes and flags), each of which must get its architectural
//!   answer (#GP with the MSR unchanged, or a negative errno), then valid kvmclock, steal-time,
//!   PV EOI and wall-clock registrations. With `pv=off` the KVM interface must be absent.
//!
//! Not covered: a KVM hypercall from CPL 3 (-KVM_EPERM). This guest runs at CPL 0 only; its
//! GDT (Vireo's boot GDT) has no user segments and it has no TSS.

use core::{
    arch::{asm, x86_64::__cpuid},
    cell::UnsafeCell,
    fmt::Write,
};

use guest_abi::{
    cpuid as abi,
    hypercall::{errno, nr, page, scope, stats_flags, Instruction},
    kvm,
    stats::{self, StatsHeader, FULL_SIZE, HEADER_SIZE, KINDS, KINDS_V1, MAGIC, RECORD_SIZE},
};

use crate::{
    checks::{rdmsr, wrmsr, Tally},
    console::Console,
    guest::{call, native},
};

/// A page-aligned page of this guest's RAM. The guest runs identity-mapped, so its address
/// is also its guest-physical address, which is what the MSRs and hypercalls take.
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; 4096]>);

// SAFETY: only the BSP runs these checks; Vireo writes the pages between our accesses
// (during exits), and every guest access to them is volatile.
unsafe impl Sync for Page {}

impl Page {
    const fn new() -> Self {
        Self(UnsafeCell::new([0; 4096]))
    }

    fn gpa(&self) -> u64 {
        self.0.get() as u64
    }

    fn read<const N: usize>(&self, off: usize) -> [u8; N] {
        assert!(off + N <= 4096);
        let mut b = [0u8; N];
        for (i, x) in b.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); volatile because Vireo writes the page.
            *x = unsafe { core::ptr::read_volatile((self.gpa() as *const u8).add(off + i)) };
        }
        b
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= 4096);
        for (i, x) in bytes.iter().enumerate() {
            // SAFETY: in bounds (checked above).
            unsafe { core::ptr::write_volatile((self.gpa() as *mut u8).add(off + i), *x) };
        }
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.read(off))
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.read(off))
    }
}

/// The hypercall page Vireo fills with stubs.
static HC_PAGE: Page = Page::new();
/// Statistics buffers (header + records) and the KVM shared areas, each in a page of its own.
static STATS_A: Page = Page::new();
static STATS_B: Page = Page::new();
static KVM_AREAS: Page = Page::new();
/// Offsets of the KVM areas in [`KVM_AREAS`]: 64-byte aligned as steal time needs.
const CLOCK_OFF: usize = 0;
const STEAL_OFF: usize = 64;
const EOI_OFF: usize = 128;
const WALL_OFF: usize = 192;

/// Calls hypercall `nr` through its stub in the page at `base` (the stub does
/// `mov eax, nr; vmcall|vmmcall; ret` and clobbers only RAX).
fn page_call(base: u64, nr: u64, args: [u64; 4]) -> i64 {
    let stub = base + page::offset(nr).expect("a Vireo number with a stub") as u64;
    let ret: u64;
    // RBX cannot be an inline-asm operand (LLVM reserves it): argument 0 travels in R8 and is
    // swapped in around the call, as in `guest_abi::hypercall::call`. The stub's address is
    // in a named register: with `in(reg)` the compiler may pick RBX, which the swap then
    // overwrites. No `nostack`: CALL pushes the return address.
    // SAFETY: `stub` is code Vireo wrote into our page (checked byte for byte before the
    // first call); buffers named by the arguments are our own or deliberately invalid.
    unsafe {
        asm!(
            "xchg r8, rbx",
            "call rdi",
            "xchg r8, rbx",
            in("rdi") stub,
            out("rax") ret,
            inout("r8") args[0] => _,
            in("rcx") args[1],
            in("rdx") args[2],
            in("rsi") args[3],
        )
    };
    ret as i64
}

fn pcall(nr: u64, args: [u64; 4]) -> i64 {
    page_call(HC_PAGE.gpa(), nr, args)
}

fn cpuid_exits(n: u32) {
    for i in 0..n {
        core::hint::black_box(__cpuid(i % 2));
    }
}

/// A check's failures: each is printed with its detail as it happens (the Tally line then
/// says FAIL with the first one's summary).
struct Fails {
    name: &'static str,
    first: Option<&'static str>,
}

impl Fails {
    fn new(name: &'static str) -> Self {
        Self { name, first: None }
    }

    /// Records `why` unless `ok`, printing `detail`.
    fn expect(&mut self, ok: bool, why: &'static str, detail: core::fmt::Arguments<'_>) {
        if !ok {
            let _ = writeln!(Console, "selftest: {} detail: {why}: {detail}", self.name);
            self.first.get_or_insert(why);
        }
    }

    fn result(&self) -> Result<(), &'static str> {
        self.first.map_or(Ok(()), Err)
    }
}

fn insn_name(i: Instruction) -> &'static str {
    match i {
        Instruction::Vmcall => "vmcall",
        Instruction::Vmmcall => "vmmcall",
    }
}

/// The header and the count of exit kind `kind` in a statistics buffer.
fn parse_stats(buf: &Page) -> (StatsHeader, impl Fn(usize) -> u64 + '_) {
    let h = StatsHeader::from_bytes(&buf.read::<HEADER_SIZE>(0));
    (h, move |kind: usize| buf.u64_at(HEADER_SIZE + kind * RECORD_SIZE))
}

fn kind(name: &str) -> usize {
    stats::KIND_NAMES.iter().position(|k| *k == name).expect("a known exit kind")
}

/// The hypercall page and the version 2 calls made through it. Registers the page, which
/// stays registered (later checks call through it).
pub fn hypercall_page(t: &mut Tally, cpus: usize) {
    let version = __cpuid(abi::LEAF_VERSION);
    let leaf = __cpuid(abi::LEAF_HYPERCALL_PAGE);
    let insn = native();
    let mut f = Fails::new("hypercall_page");
    f.expect(
        version.eax == guest_abi::ABI_VERSION && version.eax >= 0x2,
        "ABI version",
        format_args!("eax={:#x}", version.eax),
    );
    f.expect(
        version.ebx & abi::features::HYPERCALL_PAGE != 0 && version.ebx & abi::features::STATS != 0,
        "feature bits",
        format_args!("ebx={:#x}", version.ebx),
    );
    f.expect(
        leaf.eax == page::MSR && leaf.ebx == 32 && leaf.ecx == 128 && leaf.edx == 0,
        "CPUID 0x40000102",
        format_args!("eax={:#x} ebx={} ecx={} edx={:#x}", leaf.eax, leaf.ebx, leaf.ecx, leaf.edx),
    );
    let msr = leaf.eax;
    let gpa = HC_PAGE.gpa();
    // A marker in the page: the enabling write must overwrite it.
    HC_PAGE.write(0, &[0x90; 64]);
    let w = wrmsr(msr, gpa | page::ENABLE);
    f.expect(w.is_none(), "enabling write faulted", format_args!("gpa={gpa:#x} fault={w:?}"));
    let back = rdmsr(msr);
    f.expect(back == Ok(gpa | 1), "MSR read back", format_args!("{back:?}"));
    // Stub 0 spelled out by hand (not from guest_abi's own builder), then every stub.
    let op = match insn {
        Instruction::Vmcall => 0xC1,
        Instruction::Vmmcall => 0xD9,
    };
    let s0: [u8; 10] = HC_PAGE.read(0);
    f.expect(
        s0 == [0xB8, 0x00, 0x00, 0x49, 0x56, 0x0F, 0x01, op, 0xC3, 0xCC],
        "stub 0 bytes",
        format_args!("{s0:02x?}"),
    );
    let mut bad_stubs = 0;
    for i in 0..page::STUBS {
        let s: [u8; 32] = HC_PAGE.read(i * 32);
        let imm = u32::from_le_bytes([s[1], s[2], s[3], s[4]]);
        let ok = s[0] == 0xB8
            && imm == 0x5649_0000 + i as u32
            && s[5..8] == [0x0F, 0x01, op]
            && s[8] == 0xC3
            && s[9..].iter().all(|b| *b == 0xCC);
        bad_stubs += (!ok) as u32;
    }
    f.expect(bad_stubs == 0, "malformed stubs", format_args!("{bad_stubs} of {}", page::STUBS));
    if f.first.is_none() {
        let ping = pcall(nr::PING, [41, 0, 0, 0]);
        f.expect(ping == 42, "PING", format_args!("{ping}"));
        let v = pcall(nr::VERSION, [0; 4]);
        f.expect(v == guest_abi::ABI_VERSION as i64, "VERSION", format_args!("{v:#x}"));
        let feat = pcall(nr::FEATURES, [0; 4]);
        f.expect(feat == version.ebx as i64, "FEATURES != CPUID", format_args!("{feat:#x} vs {:#x}", version.ebx));
        let info = pcall(nr::VCPU_INFO, [0; 4]);
        f.expect(info == (cpus as i64) << 16, "VCPU_INFO", format_args!("{info:#x} (cpus={cpus}, vCPU 0)"));
        // Disabling keeps the contents; re-enabling rewrites them.
        let off = wrmsr(msr, 0);
        f.expect(off.is_none() && rdmsr(msr) == Ok(0), "disabling write", format_args!("{off:?}"));
        HC_PAGE.write(32, &[0xF4; 32]);
        let on = wrmsr(msr, gpa | page::ENABLE);
        let s1: [u8; 9] = HC_PAGE.read(32);
        f.expect(
            on.is_none() && s1 == [0xB8, 0x01, 0x00, 0x49, 0x56, 0x0F, 0x01, op, 0xC3],
            "re-enabling did not rewrite the page",
            format_args!("{on:?} {s1:02x?}"),
        );
        let v = pcall(nr::VERSION, [0; 4]);
        f.expect(v == guest_abi::ABI_VERSION as i64, "VERSION after re-enabling", format_args!("{v:#x}"));
    }
    let page_ok = f.first.is_none();
    t.check_detail(
        "hypercall_page",
        f.result(),
        format_args!("msr={msr:#x} stub_size={} stubs={} gpa={gpa:#x} insn={}", leaf.ebx, leaf.ecx, insn_name(insn)),
    );
    if !page_ok {
        // The page is unusable: calling into it could run anything.
        let _ = writeln!(Console, "selftest: hypercall_page_* skipped: no usable page");
        t.check("hypercall_page_calls", Err("skipped: no usable page"));
        return;
    }

    // STATS for this vCPU and for the VM; the CPUID count grows with CPUIDs.
    let mut f = Fails::new("hypercall_page_stats");
    let full = FULL_SIZE as u64;
    let r1 = pcall(nr::STATS, [STATS_A.gpa(), full, scope::SELF, 0]);
    let (h1, c1) = parse_stats(&STATS_A);
    let cpuid1 = c1(kind("cpuid"));
    let hcalls1 = c1(kind("hypercall"));
    cpuid_exits(5);
    let r2 = pcall(nr::STATS, [STATS_B.gpa(), full, scope::SELF, 0]);
    let (h2, c2) = parse_stats(&STATS_B);
    let cpuid2 = c2(kind("cpuid"));
    f.expect(r1 == full as i64 && r2 == full as i64, "STATS size", format_args!("{r1} {r2} (want {full})"));
    f.expect(
        h1.magic == MAGIC && &h1.magic.to_le_bytes() == b"VSTA" && h1.version == 1,
        "header magic/version",
        format_args!("magic={:#x} version={}", h1.magic, h1.version),
    );
    f.expect(h1.kinds == 20 && h1.kinds as usize == KINDS, "kinds", format_args!("{}", h1.kinds));
    f.expect(h1.vcpus == 1, "vcpus (SELF)", format_args!("{}", h1.vcpus));
    f.expect(h1.tsc_khz > 0, "tsc_khz", format_args!("{}", h1.tsc_khz));
    f.expect(
        h1.since_tsc <= h1.now_tsc && h1.now_tsc < h2.now_tsc,
        "TSC fields",
        format_args!("since={} now={} then={}", h1.since_tsc, h1.now_tsc, h2.now_tsc),
    );
    f.expect(cpuid1 > 0 && hcalls1 > 0, "no CPUID/hypercall exits", format_args!("{cpuid1} {hcalls1}"));
    f.expect(cpuid2 >= cpuid1 + 5, "CPUID count did not grow by 5", format_args!("{cpuid1} -> {cpuid2}"));
    let rv = pcall(nr::STATS, [STATS_B.gpa(), full, scope::VM, 0]);
    let (hv, cv) = parse_stats(&STATS_B);
    f.expect(
        rv == full as i64 && hv.vcpus == cpus as u32 && cv(kind("cpuid")) >= cpuid2,
        "STATS scope VM",
        format_args!("ret={rv} vcpus={} cpuid={}", hv.vcpus, cv(kind("cpuid"))),
    );
    let r0 = pcall(nr::STATS, [STATS_B.gpa(), full, 0, 0]);
    f.expect(r0 == full as i64, "STATS scope vCPU 0", format_args!("{r0}"));
    // A buffer with room for two records gets the header and two records.
    let short = (HEADER_SIZE + 2 * RECORD_SIZE) as u64;
    let rs = pcall(nr::STATS, [STATS_B.gpa(), short + 8, scope::SELF, 0]);
    f.expect(rs == short as i64, "STATS with a short buffer", format_args!("{rs} (want {short})"));
    // Version 1's EXIT_STATS, called directly: bare records of this vCPU, as before.
    let v1 = call(nr::EXIT_STATS, [STATS_B.gpa(), (KINDS * RECORD_SIZE) as u64, 0, 0]);
    let v1_cpuid = STATS_B.u64_at(kind("cpuid") * RECORD_SIZE);
    f.expect(
        v1 == KINDS as i64 && v1_cpuid >= cpuid2,
        "EXIT_STATS (version 1)",
        format_args!("ret={v1} cpuid={v1_cpuid}"),
    );
    // A buffer for the 19 kinds of ABI 0.1-0.3 gets 19 records; one byte less is too short.
    let v1_old = call(nr::EXIT_STATS, [STATS_B.gpa(), (KINDS_V1 * RECORD_SIZE) as u64, 0, 0]);
    f.expect(v1_old == KINDS_V1 as i64, "EXIT_STATS with a version 1 buffer", format_args!("{v1_old}"));
    let v1_short = call(nr::EXIT_STATS, [STATS_B.gpa(), (KINDS_V1 * RECORD_SIZE) as u64 - 1, 0, 0]);
    f.expect(v1_short == -errno::E2BIG, "EXIT_STATS short buffer", format_args!("{v1_short}"));
    t.check_detail(
        "hypercall_page_stats",
        f.result(),
        format_args!("kinds={} tsc_khz={} cpuid={cpuid1}->{cpuid2} vm_vcpus={}", h1.kinds, h1.tsc_khz, hv.vcpus),
    );

    // STATS_MARK, then STATS since the mark: only what happened in between. Nothing is
    // printed in between (every console byte is an exit).
    let mut f = Fails::new("hypercall_page_stats_mark");
    let before = rdtsc();
    let m = pcall(nr::STATS_MARK, [scope::SELF, 0, 0, 0]);
    cpuid_exits(3);
    let r = pcall(nr::STATS, [STATS_A.gpa(), full, scope::SELF, stats_flags::SINCE_MARK]);
    let (h, c) = parse_stats(&STATS_A);
    let total: u64 = (0..KINDS).map(&c).sum();
    let (cpuid, hcalls) = (c(kind("cpuid")), c(kind("hypercall")));
    f.expect(m == 0 && r == full as i64, "STATS_MARK/STATS", format_args!("{m} {r}"));
    f.expect(cpuid == 3, "CPUID exits since the mark", format_args!("{cpuid} (want 3)"));
    // The mark's own hypercall exit is counted after the mark was taken.
    f.expect((1..=2).contains(&hcalls), "hypercall exits since the mark", format_args!("{hcalls}"));
    f.expect(total < 50, "too many exits since the mark", format_args!("{total}"));
    f.expect(
        h.since_tsc >= before && h.since_tsc <= h.now_tsc,
        "since_tsc is not the mark",
        format_args!("since={} before={before} now={}", h.since_tsc, h.now_tsc),
    );
    let all = pcall(nr::STATS, [STATS_B.gpa(), full, scope::SELF, 0]);
    let (ha, ca) = parse_stats(&STATS_B);
    f.expect(
        all == full as i64 && ca(kind("cpuid")) > cpuid && ha.since_tsc < h.since_tsc,
        "STATS without SINCE_MARK counts from the start",
        format_args!("cpuid={} since={}", ca(kind("cpuid")), ha.since_tsc),
    );
    let mv = pcall(nr::STATS_MARK, [scope::VM, 0, 0, 0]);
    let rv = pcall(nr::STATS, [STATS_B.gpa(), full, scope::VM, stats_flags::SINCE_MARK]);
    let (_, cv) = parse_stats(&STATS_B);
    f.expect(
        mv == 0 && rv == full as i64 && cv(kind("cpuid")) < 50,
        "VM-scope mark",
        format_args!("{mv} {rv} cpuid={}", cv(kind("cpuid"))),
    );
    t.check_detail(
        "hypercall_page_stats_mark",
        f.result(),
        format_args!("cpuid={cpuid} hypercall={hcalls} total={total}"),
    );

    // Steal time through the page: never negative, the VM's at least this vCPU's.
    let mut f = Fails::new("hypercall_page_steal_time");
    let own = pcall(nr::STEAL_TIME, [scope::SELF, 0, 0, 0]);
    let vm = pcall(nr::STEAL_TIME, [scope::VM, 0, 0, 0]);
    let v0 = pcall(nr::STEAL_TIME, [0, 0, 0, 0]);
    let bad = pcall(nr::STEAL_TIME, [cpus as u64, 0, 0, 0]);
    f.expect(own >= 0 && vm >= own && v0 >= 0, "steal time", format_args!("self={own} vm={vm} vcpu0={v0}"));
    f.expect(bad == -errno::EINVAL, "STEAL_TIME of a vCPU that does not exist", format_args!("{bad}"));
    t.check_detail("hypercall_page_steal_time", f.result(), format_args!("self_ns={own} vm_ns={vm}"));
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Whether the VM offers the KVM interface (CPUID 0x4000_0000 says KVM).
fn kvm_offered() -> bool {
    let r = __cpuid(kvm::LEAF_SIGNATURE);
    [r.ebx, r.ecx, r.edx] == kvm::SIGNATURE
}

/// `mode=pv`: the page checks, the hostile checks of the new MSRs and calls, and the valid
/// KVM registrations. Returns the number of failed checks.
pub fn run(ram: u64, cpus: usize) -> u32 {
    let mut t = Tally::new();
    let kvm_on = kvm_offered();
    let _ = writeln!(Console, "selftest: pv start ram={ram:#x} kvm={}", if kvm_on { "on" } else { "off" });
    hypercall_page(&mut t, cpus);
    t.check("pv_cpuid", pv_cpuid(kvm_on));
    t.check("hypercall_page_msr_refuses_bad_values", page_msr_bad(ram));
    t.check("stats_bad_arguments", stats_bad(ram, cpus));
    if kvm_on {
        t.check("kvm_msr_bad_areas", kvm_msr_bad_areas(ram));
        t.check("kvm_msr_reserved_bits", kvm_msr_reserved_bits());
        t.check("kvm_hypercalls", kvm_hypercalls(cpus));
        let _ = writeln!(
            Console,
            "selftest: kvm_hypercall_cpl3 not applicable: this guest has no CPL 3 (no user segments, no TSS)"
        );
        kvmclock(&mut t);
        t.check("kvm_steal_time_area", kvm_steal_area());
        t.check("kvm_pv_eoi_and_poll_control", kvm_pv_eoi_poll());
    } else {
        t.check("kvm_interface_absent", kvm_absent());
    }
    let _ = writeln!(Console, "selftest: {} passed, {} failed", t.passed, t.failed);
    t.failed
}

fn pv_cpuid(kvm_on: bool) -> Result<(), &'static str> {
    let mut f = Fails::new("pv_cpuid");
    let sig = __cpuid(kvm::LEAF_SIGNATURE);
    let feat = __cpuid(kvm::LEAF_FEATURES);
    let vireo = __cpuid(abi::LEAF_VERSION).ebx;
    let calls = call(nr::FEATURES, [0; 4]);
    f.expect(calls == vireo as i64, "FEATURES != CPUID", format_args!("{calls:#x} {vireo:#x}"));
    if kvm_on {
        f.expect(sig.eax == kvm::LEAF_FEATURES, "KVM max leaf", format_args!("{:#x}", sig.eax));
        let want = kvm::features::CLOCKSOURCE2
            | kvm::features::STEAL_TIME
            | kvm::features::PV_EOI
            | kvm::features::PV_UNHALT
            | kvm::features::PV_SEND_IPI
            | kvm::features::POLL_CONTROL
            | kvm::features::PV_SCHED_YIELD;
        let never = kvm::features::CLOCKSOURCE
            | kvm::features::ASYNC_PF
            | kvm::features::ASYNC_PF_VMEXIT
            | kvm::features::ASYNC_PF_INT;
        f.expect(
            feat.eax & want == want && feat.eax & never == 0,
            "KVM feature bits",
            format_args!("eax={:#x}", feat.eax),
        );
        f.expect(vireo & abi::features::KVM_PV != 0, "Vireo's KVM_PV bit clear", format_args!("{vireo:#x}"));
    } else {
        f.expect(
            [sig.eax, sig.ebx, sig.ecx, sig.edx, feat.eax, feat.edx] == [0; 6],
            "KVM leaves not empty",
            format_args!("{:#x} {:#x} {:#x}", sig.eax, sig.ebx, feat.eax),
        );
        f.expect(vireo & abi::features::KVM_PV == 0, "Vireo's KVM_PV bit set", format_args!("{vireo:#x}"));
    }
    let _ = writeln!(Console, "selftest: pv_cpuid kvm_features={:#x} vireo_features={vireo:#x}", feat.eax);
    f.result()
}

/// A write of `value` to `msr` must #GP(0) and leave the MSR reading `old`.
fn expect_gp(f: &mut Fails, msr: u32, value: u64, old: u64, why: &'static str) {
    let w = wrmsr(msr, value);
    let r = rdmsr(msr);
    f.expect(
        w == Some((13, 0)) && r == Ok(old),
        why,
        format_args!("msr={msr:#x} value={value:#x}: fault={w:?} read back={r:x?} (old {old:#x})"),
    );
}

fn page_msr_bad(ram: u64) -> Result<(), &'static str> {
    let mut f = Fails::new("hypercall_page_msr_refuses_bad_values");
    let msr = page::MSR;
    let old = HC_PAGE.gpa() | page::ENABLE;
    let now = rdmsr(msr);
    f.expect(now == Ok(old), "page not registered", format_args!("{now:x?}"));
    for bit in [1, 5, 11] {
        expect_gp(&mut f, msr, old | 1 << bit, old, "reserved bit");
    }
    expect_gp(&mut f, msr, ram | 1, old, "page at the end of RAM");
    expect_gp(&mut f, msr, (ram + 0x10_0000) | 1, old, "page beyond RAM");
    expect_gp(&mut f, msr, 0xFEE0_0000 | 1, old, "page on the local APIC");
    expect_gp(&mut f, msr, 0xFFFF_FFFF_FFFF_F001, old, "page at the top of the address space");
    // The page still works.
    let p = pcall(nr::PING, [7, 0, 0, 0]);
    f.expect(p == 8, "PING after refused writes", format_args!("{p}"));
    f.result()
}

fn stats_bad(ram: u64, cpus: usize) -> Result<(), &'static str> {
    let mut f = Fails::new("stats_bad_arguments");
    let full = FULL_SIZE as u64;
    let buf = STATS_A.gpa();
    let cases: [(&'static str, [u64; 4], i64); 14] = [
        ("buffer beyond RAM", [ram + 0x1000, full, scope::SELF, 0], -errno::EFAULT),
        ("buffer at the end of RAM", [ram, full, scope::SELF, 0], -errno::EFAULT),
        ("buffer straddling the end of RAM", [ram - 16, full, scope::VM, 0], -errno::EFAULT),
        ("buffer on MMIO", [0xFEE0_0000, full, scope::SELF, 0], -errno::EFAULT),
        ("wrapping buffer", [u64::MAX - 8, full, scope::SELF, 0], -errno::EFAULT),
        ("buffer shorter than the header", [buf, HEADER_SIZE as u64 - 1, scope::SELF, 0], -errno::E2BIG),
        ("empty buffer", [buf, 0, scope::SELF, 0], -errno::E2BIG),
        ("vCPU that does not exist", [buf, full, cpus as u64, 0], -errno::EINVAL),
        ("scope below VM", [buf, full, scope::VM - 1, 0], -errno::EINVAL),
        ("unknown flag", [buf, full, scope::SELF, 2], -errno::EINVAL),
        ("top flag", [buf, full, scope::SELF, 1 << 63], -errno::EINVAL),
        // Arguments are checked before the buffer.
        ("bad scope with a bad buffer", [ram + 0x1000, full, 1 << 40, 0], -errno::EINVAL),
        ("bad flag with a short buffer", [buf, 4, scope::SELF, 4], -errno::EINVAL),
        ("short buffer beyond RAM", [ram + 0x1000, 16, scope::SELF, 0], -errno::E2BIG),
    ];
    for (why, args, want) in cases {
        let got = pcall(nr::STATS, args);
        f.expect(got == want, why, format_args!("STATS{args:x?} = {got} (want {want})"));
    }
    for (num, name) in [(nr::STATS_MARK, "STATS_MARK bad scope"), (nr::STEAL_TIME, "STEAL_TIME bad scope")] {
        for s in [cpus as u64, 1 << 32, scope::VM - 1] {
            let got = pcall(num, [s, 0, 0, 0]);
            f.expect(got == -errno::EINVAL, name, format_args!("scope={s:#x}: {got}"));
        }
    }
    // Version 1's EXIT_STATS with the same kinds of buffers.
    let need = (KINDS * RECORD_SIZE) as u64;
    for (why, args, want) in [
        ("EXIT_STATS beyond RAM", [ram + 0x1000, need, 0, 0], -errno::EFAULT),
        ("EXIT_STATS straddling the end of RAM", [ram - 16, need, 0, 0], -errno::EFAULT),
        ("EXIT_STATS short buffer", [buf, (KINDS_V1 * RECORD_SIZE) as u64 - 1, 0, 0], -errno::E2BIG),
    ] {
        let got = call(nr::EXIT_STATS, args);
        f.expect(got == want, why, format_args!("EXIT_STATS{args:x?} = {got} (want {want})"));
    }
    // Vireo's numbers past the last one have no call (and past the page, no stub).
    for n in [nr::LAST + 1, guest_abi::hypercall::BASE + page::STUBS as u64] {
        let got = call(n, [0; 4]);
        f.expect(got == -errno::ENOSYS, "unknown Vireo number", format_args!("{n:#x}: {got}"));
    }
    f.result()
}

/// The four KVM MSRs that take an area, with (enabled value of a good area, area size).
fn kvm_areas() -> [(u32, &'static str, u64, u64); 4] {
    let base = KVM_AREAS.gpa();
    [
        (kvm::msr::SYSTEM_TIME_NEW, "system_time", (base + CLOCK_OFF as u64) | 1, kvm::pvclock::SIZE as u64),
        (kvm::msr::STEAL_TIME, "steal_time", (base + STEAL_OFF as u64) | 1, kvm::steal::SIZE as u64),
        (kvm::msr::PV_EOI_EN, "pv_eoi", (base + EOI_OFF as u64) | 1, 4),
        // No enable bit: every write names an area.
        (kvm::msr::WALL_CLOCK_NEW, "wall_clock", base + WALL_OFF as u64, kvm::pvclock::WALL_CLOCK_SIZE as u64),
    ]
}

fn kvm_msr_bad_areas(ram: u64) -> Result<(), &'static str> {
    let mut f = Fails::new("kvm_msr_bad_areas");
    for (msr, name, good, size) in kvm_areas() {
        let enable = good & 1;
        let w = wrmsr(msr, good);
        f.expect(w.is_none() && rdmsr(msr) == Ok(good), "good area refused", format_args!("{name} {good:#x}: {w:?}"));
        expect_gp(&mut f, msr, ram | enable, good, "area at the end of RAM");
        expect_gp(&mut f, msr, (ram + 0x40_0000) | enable, good, "area beyond RAM");
        expect_gp(&mut f, msr, 0xFEE0_0000 | enable, good, "area on the local APIC");
        expect_gp(&mut f, msr, 0xC000_0000 | enable, good, "area in unassigned space");
        // Straddling the end: only the areas whose alignment lets them cross it (steal time
        // is 64-byte and PV EOI 4-byte aligned; their straddling addresses are reserved bits).
        if size > 4 && msr != kvm::msr::STEAL_TIME {
            let at = (ram - size / 2) & !1;
            expect_gp(&mut f, msr, at | enable, good, "area straddling the end of RAM");
        }
    }
    // Misaligned steal area: 0x...08 | 1.
    let steal = (KVM_AREAS.gpa() + STEAL_OFF as u64) | 1;
    expect_gp(&mut f, kvm::msr::STEAL_TIME, steal + 8, steal, "misaligned steal area");
    // Disabling takes any address (KVM ignores it then).
    for (msr, name, _, _) in kvm_areas().into_iter().take(3) {
        let w = wrmsr(msr, 0);
        f.expect(w.is_none() && rdmsr(msr) == Ok(0), "disabling write", format_args!("{name}: {w:?}"));
    }
    f.result()
}

fn kvm_msr_reserved_bits() -> Result<(), &'static str> {
    let mut f = Fails::new("kvm_msr_reserved_bits");
    let base = KVM_AREAS.gpa();
    let steal = (base + STEAL_OFF as u64) | 1;
    let w = wrmsr(kvm::msr::STEAL_TIME, steal);
    f.expect(w.is_none(), "steal area refused", format_args!("{w:?}"));
    for bit in 1..=5 {
        expect_gp(&mut f, kvm::msr::STEAL_TIME, steal | 1 << bit, steal, "steal time reserved bit");
        // Reserved bits fault with the area disabled too.
        expect_gp(&mut f, kvm::msr::STEAL_TIME, (steal & !1) | 1 << bit, steal, "steal time reserved bit, disabled");
    }
    let eoi = (base + EOI_OFF as u64) | 1;
    let w = wrmsr(kvm::msr::PV_EOI_EN, eoi);
    f.expect(w.is_none(), "PV EOI area refused", format_args!("{w:?}"));
    expect_gp(&mut f, kvm::msr::PV_EOI_EN, eoi | 2, eoi, "PV EOI bit 1");
    let w = wrmsr(kvm::msr::POLL_CONTROL, 1);
    f.expect(w.is_none(), "poll control 1 refused", format_args!("{w:?}"));
    for v in [2, 3, 1 << 63] {
        expect_gp(&mut f, kvm::msr::POLL_CONTROL, v, 1, "poll control reserved bit");
    }
    for msr in [kvm::msr::STEAL_TIME, kvm::msr::PV_EOI_EN] {
        let _ = wrmsr(msr, 0);
    }
    // MSRs of the range Vireo does not offer: async PF, the old clock MSRs, the range's end.
    for msr in [kvm::msr::ASYNC_PF_EN, kvm::msr::WALL_CLOCK, kvm::msr::SYSTEM_TIME, 0x4b56_4d06, 0x4b56_4dff] {
        let r = rdmsr(msr);
        let w = wrmsr(msr, 0);
        f.expect(r == Err((13, 0)) && w == Some((13, 0)), "MSR not offered", format_args!("{msr:#x}: {r:x?} {w:?}"));
    }
    f.result()
}

fn kvm_hypercalls(cpus: usize) -> Result<(), &'static str> {
    let mut f = Fails::new("kvm_hypercalls");
    const SHORTHAND_SELF: u64 = 1 << 18;
    const SHORTHAND_ALL: u64 = 2 << 18;
    const DEST_LOGICAL: u64 = 1 << 11;
    let cases: [(&'static str, u64, [u64; 4], i64); 12] = [
        // A kick to an APIC ID with no vCPU wakes nobody (a kick to ourselves would make our
        // next HLT return at once: not done here).
        ("KICK_CPU to a missing APIC ID", kvm::hc::KICK_CPU, [0, cpus as u64 + 7, 0, 0], 0),
        ("KICK_CPU to APIC ID 2^64-1", kvm::hc::KICK_CPU, [0, u64::MAX, 0, 0], 0),
        ("SEND_IPI shorthand self", kvm::hc::SEND_IPI, [1, 0, 0, 0xF0 | SHORTHAND_SELF], -kvm::hc::EINVAL),
        ("SEND_IPI shorthand all", kvm::hc::SEND_IPI, [1, 0, 0, 0xF0 | SHORTHAND_ALL], -kvm::hc::EINVAL),
        ("SEND_IPI logical destination", kvm::hc::SEND_IPI, [1, 0, 0, 0xF0 | DEST_LOGICAL], -kvm::hc::EINVAL),
        ("SEND_IPI INIT", kvm::hc::SEND_IPI, [1, 0, 0, 0x500], -kvm::hc::EINVAL),
        ("SEND_IPI vector below 16", kvm::hc::SEND_IPI, [1, 0, 0, 0x0F], -kvm::hc::EINVAL),
        // Destinations past the last vCPU reach nobody.
        ("SEND_IPI to missing vCPUs", kvm::hc::SEND_IPI, [u64::MAX, u64::MAX, cpus as u64, 0xF0], 0),
        ("unknown KVM number 13", 13, [0; 4], -kvm::hc::ENOSYS),
        ("unknown KVM number 999", 999, [0; 4], -kvm::hc::ENOSYS),
        ("MMU_OP (not offered)", kvm::hc::MMU_OP, [0; 4], -kvm::hc::ENOSYS),
        ("number just below Vireo's", guest_abi::hypercall::BASE - 1, [0; 4], -kvm::hc::ENOSYS),
    ];
    for (why, n, args, want) in cases {
        let got = call(n, args);
        f.expect(got == want, why, format_args!("hypercall {n}{args:x?} = {got} (want {want})"));
    }
    if cpus >= 2 {
        // vCPU 1 exists but was never started (no SIPI): a kick and a PV IPI still reach it
        // (counted at the VM's end as kicks and pv_ipis), and it stays waiting for SIPI.
        let k = call(kvm::hc::KICK_CPU, [0, 1, 0, 0]);
        f.expect(k == 0, "KICK_CPU to vCPU 1", format_args!("{k}"));
        let n = call(kvm::hc::SEND_IPI, [0b10, 0, 0, 0xF0]);
        f.expect(n == 1, "SEND_IPI to vCPU 1", format_args!("{n} vCPUs reached (want 1)"));
        let n = call(kvm::hc::SEND_IPI, [0b1, 0, 1, 0xF0]);
        f.expect(n == 1, "SEND_IPI to vCPU 1 by its own base", format_args!("{n} vCPUs reached (want 1)"));
    }
    // SCHED_YIELD gives the host CPU away and returns 0.
    let y = call(kvm::hc::SCHED_YIELD, [0, 0, 0, 0]);
    f.expect(y == 0, "SCHED_YIELD", format_args!("{y}"));
    f.result()
}

/// Reads the pvclock record with the version protocol: (version, tsc_timestamp,
/// system_time, mul, shift, flags).
fn read_pvclock() -> (u32, u64, u64, u32, i8, u8) {
    let p = &KVM_AREAS;
    loop {
        let v = p.u32_at(CLOCK_OFF);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let rec: [u8; 32] = p.read(CLOCK_OFF);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if v & 1 == 0 && p.u32_at(CLOCK_OFF) == v {
            let u64_at = |o: usize| u64::from_le_bytes(rec[o..o + 8].try_into().unwrap());
            return (
                v,
                u64_at(kvm::pvclock::TSC_TIMESTAMP),
                u64_at(kvm::pvclock::SYSTEM_TIME),
                u32::from_le_bytes(rec[24..28].try_into().unwrap()),
                rec[kvm::pvclock::TSC_SHIFT] as i8,
                rec[kvm::pvclock::FLAGS],
            );
        }
    }
}

/// Nanoseconds at `tsc` from a pvclock record (computed here, not with guest_abi's helper
/// Vireo itself uses, so a shared mistake cannot hide).
fn pvclock_ns(tsc: u64, stamp: u64, system_time: u64, mul: u32, shift: i8) -> u64 {
    let mut d = tsc.wrapping_sub(stamp);
    if shift >= 0 {
        d <<= shift;
    } else {
        d >>= -shift;
    }
    system_time.wrapping_add(((d as u128 * mul as u128) >> 32) as u64)
}

fn kvmclock(t: &mut Tally) {
    let mut f = Fails::new("kvmclock");
    let gpa = KVM_AREAS.gpa() + CLOCK_OFF as u64;
    KVM_AREAS.write(CLOCK_OFF, &[0; 32]);
    let w = wrmsr(kvm::msr::SYSTEM_TIME_NEW, gpa | 1);
    f.expect(w.is_none(), "registration faulted", format_args!("{w:?}"));
    let (version, stamp, system_time, mul, shift, flags) = read_pvclock();
    let stable_cpuid = __cpuid(kvm::LEAF_FEATURES).eax & kvm::features::CLOCKSOURCE_STABLE_BIT != 0;
    f.expect(version != 0 && version.is_multiple_of(2), "version", format_args!("{version}"));
    f.expect(mul != 0 && (-32..=32).contains(&shift), "mul/shift", format_args!("mul={mul:#x} shift={shift}"));
    f.expect(
        (flags & kvm::pvclock::TSC_STABLE != 0) == stable_cpuid,
        "TSC_STABLE flag disagrees with CPUID 0x40000001 bit 24",
        format_args!("flags={flags:#x} cpuid_stable={stable_cpuid}"),
    );
    let t1 = rdtsc();
    f.expect(stamp <= t1, "tsc_timestamp in the future", format_args!("{stamp} > {t1}"));
    let ns1 = pvclock_ns(t1, stamp, system_time, mul, shift);
    // Some work between the readings: hypercall round trips.
    for i in 0..200 {
        core::hint::black_box(call(nr::PING, [i, 0, 0, 0]));
    }
    let t2 = rdtsc();
    let ns2 = pvclock_ns(t2, stamp, system_time, mul, shift);
    // The TSC rate Vireo measured (STATS header): the clock must agree with it within 1%.
    let _ = pcall(nr::STATS, [STATS_A.gpa(), FULL_SIZE as u64, scope::SELF, 0]);
    let khz = parse_stats(&STATS_A).0.tsc_khz;
    let want = ((t2 - t1) as u128 * 1_000_000 / khz.max(1) as u128) as u64;
    let got = ns2.wrapping_sub(ns1);
    f.expect(ns2 > ns1, "the clock did not advance", format_args!("{ns1} -> {ns2}"));
    f.expect(
        got.abs_diff(want) <= want / 100 + 1_000,
        "elapsed ns disagree with the TSC rate",
        format_args!("{got} ns for {} ticks at {khz} kHz (want {want})", t2 - t1),
    );
    // Guest time 0 is the VM's start: the clock reads the time since then.
    f.expect(ns1 < 3_600_000_000_000, "the VM started over an hour ago", format_args!("{ns1}"));
    // A second registration bumps the version and keeps it even.
    let _ = wrmsr(kvm::msr::SYSTEM_TIME_NEW, gpa | 1);
    let v2 = read_pvclock().0;
    f.expect(v2 > version && v2.is_multiple_of(2), "re-registration version", format_args!("{version} -> {v2}"));
    // Wall clock: an even version, nanoseconds below a second.
    let wall = KVM_AREAS.gpa() + WALL_OFF as u64;
    let w = wrmsr(kvm::msr::WALL_CLOCK_NEW, wall);
    let (wv, sec, nsec) = (KVM_AREAS.u32_at(WALL_OFF), KVM_AREAS.u32_at(WALL_OFF + 4), KVM_AREAS.u32_at(WALL_OFF + 8));
    f.expect(
        w.is_none()
            && wv != 0
            && wv.is_multiple_of(2)
            && nsec < 1_000_000_000
            && rdmsr(kvm::msr::WALL_CLOCK_NEW) == Ok(wall),
        "wall clock",
        format_args!("{w:?} version={wv} sec={sec} nsec={nsec}"),
    );
    // The clock stays registered: the VM's end line then says kvmclock=on.
    t.check_detail(
        "kvmclock",
        f.result(),
        format_args!(
            "version={version} mul={mul:#x} shift={shift} flags={flags:#x} stable_cpuid={} ns={ns1}->{ns2} tsc_khz={khz} wall_sec={sec}",
            stable_cpuid as u8
        ),
    );
}

fn kvm_steal_area() -> Result<(), &'static str> {
    let mut f = Fails::new("kvm_steal_time_area");
    let off = STEAL_OFF;
    KVM_AREAS.write(off, &[0; 64]);
    // A preempted byte the guest left set is cleared when the vCPU runs (registration
    // publishes at once).
    KVM_AREAS.write(off + kvm::steal::PREEMPTED, &[kvm::steal::PREEMPTED_YES]);
    let gpa = (KVM_AREAS.gpa() + off as u64) | 1;
    let w = wrmsr(kvm::msr::STEAL_TIME, gpa);
    let version = KVM_AREAS.u32_at(off + kvm::steal::VERSION);
    let steal = KVM_AREAS.u64_at(off + kvm::steal::STEAL);
    let preempted = KVM_AREAS.read::<1>(off + kvm::steal::PREEMPTED)[0];
    f.expect(w.is_none() && rdmsr(kvm::msr::STEAL_TIME) == Ok(gpa), "registration", format_args!("{w:?}"));
    f.expect(version != 0 && version.is_multiple_of(2), "version", format_args!("{version}"));
    f.expect(preempted == 0, "preempted byte", format_args!("{preempted:#x}"));
    // Steal time never goes backwards; a yield gives Vireo a slice start to publish at.
    let _ = call(kvm::hc::SCHED_YIELD, [0; 4]);
    let later = KVM_AREAS.u64_at(off + kvm::steal::STEAL);
    let v2 = KVM_AREAS.u32_at(off + kvm::steal::VERSION);
    let running = KVM_AREAS.read::<1>(off + kvm::steal::PREEMPTED)[0];
    f.expect(
        later >= steal && v2.is_multiple_of(2) && v2 >= version,
        "steal went back",
        format_args!("{steal} -> {later}"),
    );
    // The yield ended a slice (preempted set) and a new one started (cleared again).
    f.expect(running == 0, "preempted byte after a yield", format_args!("{running:#x}"));
    let _ = writeln!(Console, "selftest: kvm_steal_time_area version={version}->{v2} steal_ns={steal}->{later}");
    // Left registered: the VM's end line then says steal_time=on.
    f.result()
}

fn kvm_pv_eoi_poll() -> Result<(), &'static str> {
    let mut f = Fails::new("kvm_pv_eoi_and_poll_control");
    let eoi = (KVM_AREAS.gpa() + EOI_OFF as u64) | 1;
    KVM_AREAS.write(EOI_OFF, &[0; 4]);
    let w = wrmsr(kvm::msr::PV_EOI_EN, eoi);
    f.expect(w.is_none() && rdmsr(kvm::msr::PV_EOI_EN) == Ok(eoi), "PV EOI", format_args!("{w:?}"));
    // With no interrupt in service Vireo offers no EOI skip: the word stays 0.
    let word = KVM_AREAS.u32_at(EOI_OFF);
    f.expect(word == 0, "PV EOI word set with nothing in service", format_args!("{word:#x}"));
    let w = wrmsr(kvm::msr::POLL_CONTROL, 1);
    f.expect(w.is_none() && rdmsr(kvm::msr::POLL_CONTROL) == Ok(1), "poll control", format_args!("{w:?}"));
    let w = wrmsr(kvm::msr::POLL_CONTROL, 0);
    f.expect(w.is_none() && rdmsr(kvm::msr::POLL_CONTROL) == Ok(0), "poll control off", format_args!("{w:?}"));
    // PV EOI stays registered: the VM's end line then says pv_eoi=on.
    f.result()
}

fn kvm_absent() -> Result<(), &'static str> {
    let mut f = Fails::new("kvm_interface_absent");
    let good = KVM_AREAS.gpa() | 1;
    for msr in [
        kvm::msr::WALL_CLOCK_NEW,
        kvm::msr::SYSTEM_TIME_NEW,
        kvm::msr::STEAL_TIME,
        kvm::msr::PV_EOI_EN,
        kvm::msr::POLL_CONTROL,
        kvm::msr::ASYNC_PF_EN,
    ] {
        let r = rdmsr(msr);
        let w = wrmsr(msr, good);
        let w0 = wrmsr(msr, 0);
        f.expect(
            r == Err((13, 0)) && w == Some((13, 0)) && w0 == Some((13, 0)),
            "KVM MSR without pv=kvm",
            format_args!("{msr:#x}: read={r:x?} write={w:?} write0={w0:?}"),
        );
    }
    for n in [1, kvm::hc::KICK_CPU, kvm::hc::CLOCK_PAIRING, kvm::hc::SEND_IPI, kvm::hc::SCHED_YIELD, 12, 13] {
        let got = call(n, [0, 0, 0, 0xF0]);
        f.expect(got == -kvm::hc::ENOSYS, "KVM hypercall without pv=kvm", format_args!("{n}: {got}"));
    }
    f.result()
}
