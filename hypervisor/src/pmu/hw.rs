//! The hardware path of the virtual PMU: where the host CPU has a working PMU, a vCPU's
//! counters are the host's counters, counting guest execution only.
//!
//! The guest's PMU MSRs stay intercepted: [`Pmu`] keeps validating them (reserved bits are
//! #GP as on the software path) and holds the guest's registers while they are not in the
//! hardware. This module is the vendor-neutral logic around it:
//! - detection ([`caps`], [`probe`]): Intel architectural PMU version 2 or later with at
//!   least the counters Vireo offers (CPUID 0AH) and full-width counter writes; AMD
//!   PerfCtrExtCore (CPUID 8000_0001H ECX[23]). Emulators without a PMU (QEMU TCG, Bochs,
//!   which advertise one in CPUID and ignore its MSRs) fail the probe: a counter programmed
//!   to count cycles stands still. They keep the software path, unchanged;
//! - event selection ([`source`], [`evtsel`], [`fixed_ctrl`]): which guest event selects
//!   reach the hardware and how: the interrupt and pin-control bits are dropped (the host
//!   never takes a PMI for a guest counter: overflow is found at exits, [`HwVcpu::poll`]);
//!   on AMD GuestOnly (bit 40) is forced on and HostOnly (bit 41) off, so the counter
//!   stops while Vireo runs (APM Vol. 2 §13.2.1, with EFER.SVME = 1); events whose
//!   counting depends on host MSRs the guest cannot program (Intel OFFCORE_RESPONSE,
//!   load latency) count nothing;
//! - guest-only counting on Intel: IA32_PERF_GLOBAL_CTRL holds the guest's value in guest
//!   mode and 0 in host mode, loaded by the VM-entry / VM-exit "load IA32_PERF_GLOBAL_CTRL"
//!   controls (SDM Vol. 3C §25.7.1 Table 25-13 bit 12, §25.8.1 Table 25-15 bit 13; guest
//!   and host fields 2808H / 2C04H; loaded per §27.3.2.1 on entry, §28.5.1 on exit):
//!   [`GlobalCtrlSwitch`], which the backend turns into its controls;
//! - the world switch ([`HwVcpu::slice_start`], [`HwVcpu::slice_end`]): lazily, only for a
//!   vCPU with a live hardware counter (none: no MSR traffic at all), the counters are
//!   loaded at the start of a slice with the host's LVT performance counter entry masked,
//!   and saved (and disabled) at its end with the LVTPC restored. Saving at every slice end
//!   makes a time slice, a move to another host CPU and another VM's vCPU on the same host
//!   CPU the same case: the next vCPU's load overwrites every counter register.
//!
//! Everything goes through [`MsrFile`] / [`HostCpu`], so the logic is tested on the build
//! host with a fake MSR file (`tests.rs`).

use super::{amd, intel, Pmu, Source, Vendor, Which, COUNTER_MASK, COUNTER_WIDTH, FIXED_COUNTERS, MAX_GP};

/// RDMSR/WRMSR on one host CPU.
pub trait MsrFile {
    fn rdmsr(&mut self, msr: u32) -> u64;
    fn wrmsr(&mut self, msr: u32, value: u64);
}

/// A host CPU as the hardware path uses it: its MSRs and its local APIC's LVT performance
/// counter entry (SDM Vol. 3A §12.5.1; APM Vol. 2 §16.4.5).
pub trait HostCpu: MsrFile {
    fn lvtpc(&mut self) -> u32;
    fn set_lvtpc(&mut self, value: u32);
}

/// LVT mask bit (bit 16 of every LVT entry).
pub const LVT_MASKED: u32 = 1 << 16;
/// CPUID.1:ECX.PDCM[15]: IA32_PERF_CAPABILITIES exists.
pub const CPUID1_ECX_PDCM: u32 = 1 << 15;
/// CPUID Fn8000_0001 ECX[23] PerfCtrExtCore: the six core counters.
pub const EXT1_ECX_PERFCTR_CORE: u32 = 1 << 23;

/// The most events a counter is assumed to count per TSC tick (4-wide retirement at a
/// core clock up to the TSC's), for [`Pmu::ticks_to_overflow`].
pub const EVENTS_PER_TICK: u64 = 4;
/// The shortest time the guest runs before a hardware counter close to overflow is looked
/// at again, in TSC ticks (about a microsecond).
pub const MIN_POLL_TICKS: u64 = 2000;

/// The host CPUID answers detection looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCpuid {
    /// CPUID.0:EAX, the highest standard leaf.
    pub max_leaf: u32,
    pub leaf1_ecx: u32,
    /// CPUID.0AH EAX, EBX, ECX, EDX (Intel).
    pub leaf_0a: [u32; 4],
    /// CPUID.8000_0001H:ECX (AMD).
    pub ext1_ecx: u32,
}

/// What the host PMU offers, as far as the hardware path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwCaps {
    pub vendor: Vendor,
    /// Intel architectural PMU version (AMD: 0).
    pub version: u8,
    /// Intel CPUID.0AH:EBX: architectural events the host cannot count (AMD: 0).
    pub unavailable: u32,
}

/// Decides from CPUID whether the host PMU can back Vireo's virtual PMU: Intel version 2
/// or later with at least Vireo's 4 GP and 3 fixed counters of at least 48 bits (SDM Vol.
/// 2A CPUID leaf 0AH) and PDCM (for the full-width writes [`probe`] checks); AMD
/// PerfCtrExtCore. The answer still has to pass [`probe`].
pub fn caps(vendor: Vendor, c: &HostCpuid) -> Option<HwCaps> {
    match vendor {
        Vendor::Intel => {
            let [eax, ebx, _, edx] = c.leaf_0a;
            let version = eax as u8;
            let gp = (eax >> 8) as u8 as usize;
            let width = (eax >> 16) as u8 as u32;
            let fixed = (edx & 0x1F) as usize;
            let fixed_width = (edx >> 5) as u8 as u32;
            let ok = c.max_leaf >= 0xA
                && version >= 2
                && gp >= intel::GP_COUNTERS
                && width >= COUNTER_WIDTH
                && fixed >= FIXED_COUNTERS
                && fixed_width >= COUNTER_WIDTH
                && c.leaf1_ecx & CPUID1_ECX_PDCM != 0;
            ok.then_some(HwCaps { vendor, version, unavailable: ebx })
        }
        Vendor::Amd => {
            (c.ext1_ecx & EXT1_ECX_PERFCTR_CORE != 0).then_some(HwCaps { vendor, version: 0, unavailable: 0 })
        }
    }
}

/// The control and count MSRs of GP counter `i` on the host (Intel: the full-width
/// aliases; AMD: the core-extension registers).
pub fn gp_msrs(vendor: Vendor, i: usize) -> (u32, u32) {
    match vendor {
        Vendor::Intel => (intel::IA32_PERFEVTSEL0 + i as u32, intel::IA32_A_PMC0 + i as u32),
        Vendor::Amd => (amd::PERF_CTL_BASE + 2 * i as u32, amd::PERF_CTL_BASE + 2 * i as u32 + 1),
    }
}

/// GP counters the guest has, per vendor.
fn gp_count(vendor: Vendor) -> usize {
    match vendor {
        Vendor::Intel => intel::GP_COUNTERS,
        Vendor::Amd => amd::GP_COUNTERS,
    }
}

/// Fixed counters the guest has, per vendor.
fn fixed_count(vendor: Vendor) -> usize {
    match vendor {
        Vendor::Intel => FIXED_COUNTERS,
        Vendor::Amd => 0,
    }
}

/// Whether the host's counters count: GP counter 0 programmed for unhalted core cycles at
/// every privilege level (Intel 3CH, AMD PMCx076) must advance over `spin`. Every register
/// touched is left at 0 (disabled; Intel IA32_PERF_GLOBAL_CTRL 0, Vireo's host value).
/// On Intel the full-width counter aliases are required (IA32_PERF_CAPABILITIES.FW_WRITE,
/// SDM Vol. 3B §21.2.6): 48-bit guest values are written to them as they are.
pub fn probe<M: MsrFile>(caps: &HwCaps, m: &mut M, spin: impl FnOnce(&mut M)) -> bool {
    let vendor = caps.vendor;
    if vendor == Vendor::Intel && m.rdmsr(intel::IA32_PERF_CAPABILITIES) & intel::PERF_CAP_FW_WRITE == 0 {
        return false;
    }
    let (ctl, ctr) = gp_msrs(vendor, 0);
    let sel = match vendor {
        Vendor::Intel => intel::EventSelect::EN | intel::EventSelect::USR | intel::EventSelect::OS | 0x3C,
        Vendor::Amd => amd::EventSelect::EN | amd::EventSelect::USR | amd::EventSelect::OS | 0x76,
    };
    if vendor == Vendor::Intel {
        m.wrmsr(intel::IA32_PERF_GLOBAL_CTRL, 0);
    }
    m.wrmsr(ctr, 0);
    m.wrmsr(ctl, sel);
    if vendor == Vendor::Intel {
        m.wrmsr(intel::IA32_PERF_GLOBAL_CTRL, intel::gp_bit(0));
    }
    spin(m);
    if vendor == Vendor::Intel {
        m.wrmsr(intel::IA32_PERF_GLOBAL_CTRL, 0);
    }
    m.wrmsr(ctl, 0);
    let counted = m.rdmsr(ctr) & COUNTER_MASK;
    m.wrmsr(ctr, 0);
    counted != 0
}

/// Intel events counted with the help of host MSRs the guest cannot program
/// (OFFCORE_RESPONSE_0/1 with MSR_OFFCORE_RSP_x, MEM_TRANS_RETIRED.LOAD_LATENCY with
/// MSR_PEBS_LD_LAT): they would count with the host's settings, so they count nothing.
pub const INTEL_DENIED_EVENTS: [u8; 3] = [0xB7, 0xBB, 0xCD];

/// What a guest event select (already validated by [`Pmu::write`]) counts on the hardware
/// path, Vireo's own exit events aside (those stay software counters).
pub fn source(vendor: Vendor, guest: u64) -> Source {
    match vendor {
        Vendor::Intel if INTEL_DENIED_EVENTS.contains(&intel::EventSelect(guest).event()) => Source::Nothing,
        _ => Source::Hardware,
    }
}

/// The host event select for a guest's: what the guest chose minus the interrupt and pin
/// control bits; on AMD GuestOnly set and HostOnly clear. 0 (disabled) for an event that
/// does not count in hardware.
pub fn evtsel(vendor: Vendor, guest: u64) -> u64 {
    if source(vendor, guest) != Source::Hardware {
        return 0;
    }
    match vendor {
        Vendor::Intel => guest & !(intel::EventSelect::INT | intel::EventSelect::PC | intel::EventSelect::RESERVED),
        Vendor::Amd => {
            (guest & !(amd::EventSelect::INT | amd::EventSelect::HOST_ONLY | amd::EventSelect::RESERVED))
                | amd::EventSelect::GUEST_ONLY
        }
    }
}

/// The host IA32_FIXED_CTR_CTRL for the guest's: without the PMI bits (and anything a
/// version-2 PMU does not define).
pub fn fixed_ctrl(guest: u64) -> u64 {
    let pmi = (0..FIXED_COUNTERS).fold(0, |acc, i| acc | intel::fixed_ctrl::PMI << (4 * i));
    guest & intel::fixed_ctrl::VALID & !pmi
}

/// IA32_PERF_GLOBAL_CTRL on each side of the world switch (Intel): `guest` loaded by VM
/// entry, `host` by VM exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalCtrlSwitch {
    pub guest: u64,
    pub host: u64,
}

/// One host CPU's side: whose counters are loaded and the host LVTPC masked meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSlot {
    /// The vCPU (caller's key) whose counters are in this CPU's registers.
    owner: Option<u64>,
    /// The host's LVTPC, while masked for a guest counter.
    host_lvtpc: Option<u32>,
}

impl HostSlot {
    pub const fn new() -> Self {
        Self { owner: None, host_lvtpc: None }
    }

    pub fn owner(&self) -> Option<u64> {
        self.owner
    }
}

/// Counter slots kept per vCPU: GP counters, then fixed ones.
const SLOTS: usize = MAX_GP + FIXED_COUNTERS;

/// The hardware path's state of one vCPU (the guest's registers are in its [`Pmu`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HwVcpu {
    /// The host CPU holding this vCPU's counters (`None`: they are in the [`Pmu`]).
    loaded_on: Option<usize>,
    /// Each counter's value at load or at the last poll: an AMD counter found below it
    /// wrapped (overflowed) meanwhile.
    last: [u64; SLOTS],
    /// Loads and saves so far (for tests and reports).
    pub loads: u64,
    pub saves: u64,
}

impl HwVcpu {
    pub fn loaded_on(&self) -> Option<usize> {
        self.loaded_on
    }

    /// A slice of this vCPU (`key`) starts on host CPU `cpu_index`: loads its counters if
    /// a live one counts in hardware, masking the host LVTPC. Returns what IA32_PERF_GLOBAL_CTRL
    /// must be on each side of the world switch (Intel, counters loaded); `None`: nothing
    /// loaded, nothing for the backend to switch.
    pub fn slice_start<H: HostCpu>(
        &mut self,
        pmu: &Pmu,
        slot: &mut HostSlot,
        cpu: &mut H,
        cpu_index: usize,
        key: u64,
    ) -> Option<GlobalCtrlSwitch> {
        if !pmu.hardware || !pmu.hw_live {
            return None;
        }
        if self.loaded_on.is_some() {
            // Already loaded here (a reload after a guest write): nothing was saved.
            return self.switch(pmu);
        }
        let vendor = pmu.vendor;
        if vendor == Vendor::Intel {
            // Vireo's value in host mode; the guest's comes with the entry.
            cpu.wrmsr(intel::IA32_PERF_GLOBAL_CTRL, 0);
        }
        for i in 0..gp_count(vendor) {
            let (ctl, ctr) = gp_msrs(vendor, i);
            cpu.wrmsr(ctl, 0);
            cpu.wrmsr(ctr, pmu.gp[i].value);
            self.last[i] = pmu.gp[i].value;
            if pmu.gp[i].live.is_some_and(|p| p.source == Source::Hardware) {
                cpu.wrmsr(ctl, evtsel(vendor, pmu.evtsel[i]));
            }
        }
        if vendor == Vendor::Intel {
            for i in 0..FIXED_COUNTERS {
                cpu.wrmsr(intel::IA32_FIXED_CTR0 + i as u32, pmu.fixed[i].value);
                self.last[MAX_GP + i] = pmu.fixed[i].value;
            }
            cpu.wrmsr(intel::IA32_FIXED_CTR_CTRL, fixed_ctrl(pmu.fixed_ctrl));
        }
        if slot.host_lvtpc.is_none() {
            let lvtpc = cpu.lvtpc();
            slot.host_lvtpc = Some(lvtpc);
            cpu.set_lvtpc(lvtpc | LVT_MASKED);
        }
        slot.owner = Some(key);
        self.loaded_on = Some(cpu_index);
        self.loads += 1;
        self.switch(pmu)
    }

    /// IA32_PERF_GLOBAL_CTRL around the world switch while loaded (Intel): the guest's
    /// enables for the counters counting in hardware; 0 for the host.
    fn switch(&self, pmu: &Pmu) -> Option<GlobalCtrlSwitch> {
        if pmu.vendor != Vendor::Intel {
            return None;
        }
        let mut guest = 0;
        for i in 0..intel::GP_COUNTERS {
            if pmu.gp[i].live.is_some_and(|p| p.source == Source::Hardware) {
                guest |= intel::gp_bit(i);
            }
        }
        for i in 0..FIXED_COUNTERS {
            if pmu.fixed[i].live.is_some_and(|p| p.source == Source::Hardware) {
                guest |= intel::fixed_bit(i);
            }
        }
        Some(GlobalCtrlSwitch { guest: guest & pmu.global_ctrl, host: 0 })
    }

    /// Copies the loaded counters' values into `pmu` (before the guest reads one) and notes
    /// overflows since the last look (setting overflow status and asking for a PMI as the
    /// software counters do). Does nothing when not loaded.
    pub fn poll<M: MsrFile>(&mut self, pmu: &mut Pmu, cpu: &mut M) {
        if self.loaded_on.is_none() {
            return;
        }
        let vendor = pmu.vendor;
        let status = if vendor == Vendor::Intel { cpu.rdmsr(intel::IA32_PERF_GLOBAL_STATUS) } else { 0 };
        // Only the counters counting in hardware: the others' registers hold what was
        // loaded (or nothing, for Vireo's software exit counters).
        let slots = (0..gp_count(vendor)).map(Which::Gp).chain((0..fixed_count(vendor)).map(Which::Fixed));
        for w in slots {
            let (msr, slot, bit) = match w {
                Which::Gp(i) => (gp_msrs(vendor, i).1, i, intel::gp_bit(i)),
                Which::Fixed(i) => (intel::IA32_FIXED_CTR0 + i as u32, MAX_GP + i, intel::fixed_bit(i)),
            };
            let counter = pmu.counter(w);
            let Some(program) = counter.live.filter(|p| p.source == Source::Hardware) else { continue };
            let v = cpu.rdmsr(msr) & COUNTER_MASK;
            counter.value = v;
            let wrapped = match vendor {
                Vendor::Intel => status & bit != 0,
                Vendor::Amd => v < self.last[slot],
            };
            self.last[slot] = v;
            if wrapped {
                pmu.overflowed(w, program.pmi);
            }
        }
        if vendor == Vendor::Intel && status != 0 {
            // Write-1-to-clear what was seen (SDM Vol. 3B §21.2.2).
            cpu.wrmsr(intel::IA32_PERF_GLOBAL_OVF_CTRL, status & intel::GLOBAL_OVF_CTRL_VALID);
        }
    }

    /// The slice ends (or the vCPU leaves this host CPU): saves the counters into `pmu`,
    /// disables them and restores the host LVTPC. Does nothing when not loaded.
    pub fn slice_end<H: HostCpu>(&mut self, pmu: &mut Pmu, slot: &mut HostSlot, cpu: &mut H) {
        if self.loaded_on.is_none() {
            return;
        }
        let vendor = pmu.vendor;
        // Stop first, then read: nothing counts between the read and the disable.
        for i in 0..gp_count(vendor) {
            cpu.wrmsr(gp_msrs(vendor, i).0, 0);
        }
        if vendor == Vendor::Intel {
            cpu.wrmsr(intel::IA32_FIXED_CTR_CTRL, 0);
        }
        self.poll(pmu, cpu);
        // No counts of this vCPU stay behind for the next one to see.
        for i in 0..gp_count(vendor) {
            cpu.wrmsr(gp_msrs(vendor, i).1, 0);
        }
        for i in 0..fixed_count(vendor) {
            cpu.wrmsr(intel::IA32_FIXED_CTR0 + i as u32, 0);
        }
        if let Some(lvtpc) = slot.host_lvtpc.take() {
            cpu.set_lvtpc(lvtpc);
        }
        slot.owner = None;
        self.loaded_on = None;
        self.saves += 1;
    }
}

/// CPUID leaf 0AH on the hardware path: Vireo's counters (version 2, 4 GP and 3 fixed of
/// 48 bits) with the events the host can count, except that an event the host lacks stays
/// unavailable.
pub fn cpuid_0a(caps: &HwCaps) -> [u32; 4] {
    let [eax, _, ecx, edx] = intel::cpuid_0a();
    let vector = (1u32 << intel::EVENT_VECTOR_LEN) - 1;
    [eax, caps.unavailable & vector, ecx, edx]
}

/// The host PMU found at boot ([`detect`]); `None` until then and where there is none.
static HOST: spin::Once<Option<HwCaps>> = spin::Once::new();

/// Each host CPU's [`HostSlot`], by dense CPU index.
static HOST_SLOTS: [spin::Mutex<HostSlot>; crate::arch::percpu::MAX_CPUS] =
    [const { spin::Mutex::new(HostSlot::new()) }; crate::arch::percpu::MAX_CPUS];

/// The CPU Vireo runs on: its PMU MSRs and its local APIC's LVTPC.
pub struct ThisCpu(());

impl MsrFile for ThisCpu {
    fn rdmsr(&mut self, msr: u32) -> u64 {
        // SAFETY: only PMU MSRs whose presence [`caps`] established from CPUID (Intel
        // architectural PMU version >= 2 with PDCM; AMD PerfCtrExtCore) are passed here;
        // reading a counter or control has no side effect.
        unsafe { crate::arch::msr::read(msr) }
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        // SAFETY: as in `rdmsr`; the values written are event selects with reserved bits
        // cleared ([`evtsel`], [`fixed_ctrl`]), 48-bit counter values, and counter-enable
        // bits: none of them touches memory or the host's control flow (the host never
        // takes a PMI for them: the interrupt bits are dropped and the LVTPC masked).
        unsafe { crate::arch::msr::write(msr, value) }
    }
}

impl HostCpu for ThisCpu {
    fn lvtpc(&mut self) -> u32 {
        crate::arch::lapic::lvtpc()
    }
    fn set_lvtpc(&mut self, value: u32) {
        crate::arch::lapic::set_lvtpc(value)
    }
}

/// A short busy loop for [`probe`] to count cycles over.
fn spin_a_while(_: &mut ThisCpu) {
    let mut x = 0u64;
    for i in 0..100_000u64 {
        x = core::hint::black_box(x.wrapping_add(i));
    }
    core::hint::black_box(x);
}

/// Looks for a host PMU the hardware path can use (once, on the boot CPU, before any VM
/// runs): CPUID first ([`caps`]), then [`probe`]. Emulators without a PMU end up with
/// `None` (the software path).
pub fn detect(vendor: Vendor) -> Option<HwCaps> {
    *HOST.call_once(|| {
        let id = |leaf: u32| crate::vmm::cpuid::host(leaf, 0);
        let max_leaf = id(0).eax;
        let max_ext = id(0x8000_0000).eax;
        let c = HostCpuid {
            max_leaf,
            leaf1_ecx: id(1).ecx,
            leaf_0a: if max_leaf >= 0xA {
                let r = id(0xA);
                [r.eax, r.ebx, r.ecx, r.edx]
            } else {
                [0; 4]
            },
            ext1_ecx: if max_ext >= 0x8000_0001 { id(0x8000_0001).ecx } else { 0 },
        };
        let caps = caps(vendor, &c)?;
        probe(&caps, &mut ThisCpu(()), spin_a_while).then_some(caps)
    })
}

/// The host PMU [`detect`] found.
pub fn host() -> Option<HwCaps> {
    HOST.get().copied().flatten()
}

/// Runs `f` with host CPU `index`'s slot and this CPU (which must be CPU `index`).
pub fn with_this_cpu<R>(index: usize, f: impl FnOnce(&mut HostSlot, &mut ThisCpu) -> R) -> R {
    let mut slot = HOST_SLOTS[index % HOST_SLOTS.len()].lock();
    f(&mut slot, &mut ThisCpu(()))
}
