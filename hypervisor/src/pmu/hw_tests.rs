//! The hardware path ([`super::hw`]) against a fake host CPU: an MSR file that counts like
//! a PMU in guest and host mode, and an LVTPC.

use super::hw::*;
use super::*;
use std::collections::BTreeMap;

/// A fake host CPU: MSRs in a map (absent ones read 0, as an emulator that ignores them),
/// every access counted, and a PMU that counts "cycles" when told the CPU ran.
#[derive(Default)]
struct FakeCpu {
    vendor: Option<Vendor>,
    msrs: BTreeMap<u32, u64>,
    lvtpc: u32,
    /// Whether the counters count at all (false: an emulator without a PMU).
    counts: bool,
    /// RDMSR/WRMSR and LVTPC accesses.
    traffic: usize,
}

impl MsrFile for FakeCpu {
    fn rdmsr(&mut self, msr: u32) -> u64 {
        self.traffic += 1;
        self.msrs.get(&msr).copied().unwrap_or(0)
    }
    fn wrmsr(&mut self, msr: u32, value: u64) {
        self.traffic += 1;
        self.msrs.insert(msr, value);
        if msr == intel::IA32_PERF_GLOBAL_OVF_CTRL && self.vendor == Some(Vendor::Intel) {
            // Write 1 to clear.
            let s = self.get(intel::IA32_PERF_GLOBAL_STATUS);
            self.msrs.insert(intel::IA32_PERF_GLOBAL_STATUS, s & !value);
        }
    }
}

impl HostCpu for FakeCpu {
    fn lvtpc(&mut self) -> u32 {
        self.traffic += 1;
        self.lvtpc
    }
    fn set_lvtpc(&mut self, value: u32) {
        self.traffic += 1;
        self.lvtpc = value;
    }
}

const HOST_LVTPC: u32 = 0x400 | 2; // NMI delivery, unmasked

impl FakeCpu {
    fn new(vendor: Vendor) -> Self {
        let mut c = Self { vendor: Some(vendor), counts: true, lvtpc: HOST_LVTPC, ..Self::default() };
        if vendor == Vendor::Intel {
            c.msrs.insert(intel::IA32_PERF_CAPABILITIES, intel::PERF_CAP_FW_WRITE);
        }
        c
    }

    fn get(&self, msr: u32) -> u64 {
        self.msrs.get(&msr).copied().unwrap_or(0)
    }

    /// `n` cycles pass in guest mode (`guest`: IA32_PERF_GLOBAL_CTRL as VM entry loaded
    /// it, Intel) or in host mode (`None`).
    fn run(&mut self, n: u64, guest: Option<u64>) {
        if !self.counts {
            return;
        }
        let vendor = self.vendor.unwrap();
        let in_guest = guest.is_some();
        let global = guest.unwrap_or_else(|| self.get(intel::IA32_PERF_GLOBAL_CTRL));
        let gp = if vendor == Vendor::Intel { intel::GP_COUNTERS } else { amd::GP_COUNTERS };
        for i in 0..gp {
            let (ctl, ctr) = gp_msrs(vendor, i);
            let sel = self.get(ctl);
            let on = match vendor {
                Vendor::Intel => sel & intel::EventSelect::EN != 0 && global & intel::gp_bit(i) != 0,
                Vendor::Amd => {
                    let (g, h) = (sel & amd::EventSelect::GUEST_ONLY != 0, sel & amd::EventSelect::HOST_ONLY != 0);
                    sel & amd::EventSelect::EN != 0 && (g == h || (g && in_guest) || (h && !in_guest))
                }
            };
            if on {
                self.add(ctr, n, intel::gp_bit(i));
            }
        }
        if vendor == Vendor::Intel {
            let ctrl = self.get(intel::IA32_FIXED_CTR_CTRL);
            for i in 0..FIXED_COUNTERS {
                if intel::fixed_ctrl::field(ctrl, i) & 3 != 0 && global & intel::fixed_bit(i) != 0 {
                    self.add(intel::IA32_FIXED_CTR0 + i as u32, n, intel::fixed_bit(i));
                }
            }
        }
    }

    fn add(&mut self, ctr: u32, n: u64, status_bit: u64) {
        let sum = self.get(ctr) + n;
        self.msrs.insert(ctr, sum & COUNTER_MASK);
        if sum > COUNTER_MASK && self.vendor == Some(Vendor::Intel) {
            let s = self.get(intel::IA32_PERF_GLOBAL_STATUS);
            self.msrs.insert(intel::IA32_PERF_GLOBAL_STATUS, s | status_bit);
        }
    }
}

/// A vCPU on the hardware path: its PMU, its hardware state and its key.
struct V {
    pmu: Pmu,
    hw: HwVcpu,
    key: u64,
    /// IA32_PERF_GLOBAL_CTRL for guest mode, from the last slice start (Intel).
    switch: Option<GlobalCtrlSwitch>,
}

impl V {
    fn new(vendor: Vendor, key: u64) -> Self {
        Self { pmu: Pmu::new(vendor, true).with_hardware(), hw: HwVcpu::default(), key, switch: None }
    }
    fn start(&mut self, slot: &mut HostSlot, cpu: &mut FakeCpu, index: usize) {
        self.switch = self.hw.slice_start(&self.pmu, slot, cpu, index, self.key);
    }
    /// One slice: guest time `n`, with host time around it (which must not count).
    fn slice(&mut self, slot: &mut HostSlot, cpu: &mut FakeCpu, index: usize, n: u64) {
        self.start(slot, cpu, index);
        cpu.run(7, None);
        let guest = match self.pmu.vendor() {
            Vendor::Intel => self.switch.map_or(0, |s| s.guest),
            Vendor::Amd => 0,
        };
        cpu.run(n, Some(guest));
        cpu.run(11, None);
        self.hw.slice_end(&mut self.pmu, slot, cpu);
    }
    /// A guest WRMSR as the run loop does it: unload, write, load again.
    fn write(&mut self, slot: &mut HostSlot, cpu: &mut FakeCpu, index: usize, msr: u32, v: u64) -> Access {
        let loaded = self.hw.loaded_on().is_some();
        self.hw.slice_end(&mut self.pmu, slot, cpu);
        let r = self.pmu.write(msr, v);
        if loaded || self.pmu.counts_in_hardware() {
            self.start(slot, cpu, index);
        }
        r
    }
    fn read(&mut self, cpu: &mut FakeCpu, msr: u32) -> u64 {
        self.hw.poll(&mut self.pmu, cpu);
        match self.pmu.read(msr) {
            Access::Ok(v) => v,
            other => panic!("read {msr:#x}: {other:?}"),
        }
    }
}

const INTEL_CYCLES: u64 = intel::EventSelect::EN | intel::EventSelect::USR | intel::EventSelect::OS | 0x3C;
const AMD_CYCLES: u64 = amd::EventSelect::EN | amd::EventSelect::USR | amd::EventSelect::OS | 0x76;

fn intel_cpuid() -> HostCpuid {
    // Version 4, 4 GP counters of 48 bits, 7 events (LLC misses unavailable); 3 fixed of 48.
    HostCpuid { max_leaf: 0x16, leaf1_ecx: CPUID1_ECX_PDCM, leaf_0a: [0x0730_0404, 0b1_0000, 0, 0x603], ext1_ecx: 0 }
}

#[test]
fn detection_from_cpuid() {
    let c = caps(Vendor::Intel, &intel_cpuid()).unwrap();
    assert_eq!((c.version, c.unavailable), (4, 0b1_0000));
    let base = intel_cpuid();
    let without = |f: fn(&mut HostCpuid)| {
        let mut c = base;
        f(&mut c);
        caps(Vendor::Intel, &c)
    };
    assert_eq!(without(|c| c.leaf_0a = [0; 4]), None, "QEMU TCG: leaf 0AH all zero");
    assert_eq!(without(|c| c.max_leaf = 9), None);
    assert_eq!(without(|c| c.leaf_0a[0] = 0x0730_0401), None, "version 1");
    assert_eq!(without(|c| c.leaf_0a[0] = 0x0730_0204), None, "2 GP counters");
    assert_eq!(without(|c| c.leaf_0a[0] = 0x0728_0404), None, "40-bit counters");
    assert_eq!(without(|c| c.leaf_0a[3] = 0x602), None, "2 fixed counters");
    assert_eq!(without(|c| c.leaf1_ecx = 0), None, "no PDCM");
    assert!(caps(Vendor::Amd, &HostCpuid { ext1_ecx: EXT1_ECX_PERFCTR_CORE, ..HostCpuid::default() }).is_some());
    assert_eq!(caps(Vendor::Amd, &HostCpuid::default()), None);
    // Guest CPUID 0AH: Vireo's counters, the host's unavailable events.
    let [eax, ebx, _, edx] = cpuid_0a(&c);
    assert_eq!((eax, ebx, edx), (intel::cpuid_0a()[0], 0b1_0000, intel::cpuid_0a()[3]));
}

#[test]
fn probe_needs_counting_counters() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let c = HwCaps { vendor, version: 2, unavailable: 0 };
        let mut cpu = FakeCpu::new(vendor);
        assert!(probe(&c, &mut cpu, |m| m.run(1000, None)), "{vendor:?}");
        // Everything it touched is back at 0.
        let (ctl, ctr) = gp_msrs(vendor, 0);
        assert_eq!((cpu.get(ctl), cpu.get(ctr), cpu.get(intel::IA32_PERF_GLOBAL_CTRL)), (0, 0, 0));
        // An emulator that advertises a PMU and ignores its MSRs.
        let mut emu = FakeCpu { counts: false, ..FakeCpu::new(vendor) };
        assert!(!probe(&c, &mut emu, |m| m.run(1000, None)), "{vendor:?}");
    }
    // Intel without full-width writes (IA32_PERF_CAPABILITIES reads 0): not even tried.
    let c = HwCaps { vendor: Vendor::Intel, version: 2, unavailable: 0 };
    let mut cpu = FakeCpu::new(Vendor::Intel);
    cpu.msrs.clear();
    assert!(!probe(&c, &mut cpu, |m| m.run(1000, None)));
    assert_eq!(cpu.traffic, 1);
}

#[test]
fn event_select_translation() {
    use amd::EventSelect as A;
    use intel::EventSelect as I;
    // AMD: GuestOnly forced, HostOnly and INT dropped, the rest (extended event bits,
    // edge, invert, cmask) kept.
    let g = A::EN | A::USR | A::INT | A::HOST_ONLY | (0xF << 32) | 0x5_0000_00C0;
    assert_eq!(evtsel(Vendor::Amd, g), (g & !(A::INT | A::HOST_ONLY)) | A::GUEST_ONLY);
    assert_eq!(evtsel(Vendor::Amd, A::EN | A::OS | 0x76), A::EN | A::OS | 0x76 | A::GUEST_ONLY);
    // Intel: INT and PC dropped; denied events disabled.
    let g = I::EN | I::OS | I::INT | I::PC | I::EDGE | (3 << 24) | 0x01C2;
    assert_eq!(evtsel(Vendor::Intel, g), g & !(I::INT | I::PC));
    for e in INTEL_DENIED_EVENTS {
        assert_eq!(evtsel(Vendor::Intel, I::EN | I::OS | e as u64), 0);
        assert_eq!(source(Vendor::Intel, e as u64), Source::Nothing);
    }
    assert_eq!(fixed_ctrl(0xBBB), 0x333, "fixed counters' PMI bits dropped");
}

#[test]
fn reserved_bits_fault_as_on_the_software_path() {
    let mut i = Pmu::new(Vendor::Intel, true).with_hardware();
    assert_eq!(i.write(intel::IA32_PERFEVTSEL0, INTEL_CYCLES | 1 << 21), Access::Gp, "AnyThread");
    assert_eq!(i.write(intel::IA32_PERFEVTSEL0, INTEL_CYCLES | 1 << 32), Access::Gp);
    assert_eq!(i.write(intel::IA32_PERF_GLOBAL_CTRL, 1 << 4), Access::Gp);
    let mut a = Pmu::new(Vendor::Amd, true).with_hardware();
    assert_eq!(a.write(amd::PERF_CTL_BASE, AMD_CYCLES | 1 << 42), Access::Gp);
    assert_eq!(
        a.write(amd::PERF_CTL_BASE, AMD_CYCLES | amd::EventSelect::HOST_ONLY),
        Access::Ok(AMD_CYCLES | amd::EventSelect::HOST_ONLY)
    );
    // The guest reads back what it wrote, not the translated value.
    assert_eq!(a.read(amd::PERF_CTL_BASE), Access::Ok(AMD_CYCLES | amd::EventSelect::HOST_ONLY));
}

#[test]
fn lazy_no_msr_traffic_without_a_live_counter() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut cpu = FakeCpu::new(vendor);
        let mut slot = HostSlot::new();
        let mut v = V::new(vendor, 1);
        for _ in 0..10 {
            v.slice(&mut slot, &mut cpu, 0, 1000);
        }
        assert_eq!(cpu.traffic, 0, "{vendor:?}");
        assert_eq!(v.switch, None, "no VMCS controls for an idle PMU");
        assert_eq!((v.hw.loads, v.hw.saves), (0, 0));
        // A counter programmed but not enabled is not live either; neither is one counting
        // Vireo's exit events (a software counter).
        let (ctl, _) = gp_msrs(vendor, 0);
        let exits = 0x56 | if vendor == Vendor::Intel { INTEL_CYCLES & !0xFF } else { AMD_CYCLES & !0xFF };
        v.pmu.write(ctl, exits);
        assert!(v.pmu.counts_exits() && !v.pmu.counts_in_hardware());
        v.slice(&mut slot, &mut cpu, 0, 1000);
        assert_eq!(cpu.traffic, 0, "{vendor:?}");
    }
}

#[test]
fn save_restore_round_trip_counts_guest_time_only() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut cpu = FakeCpu::new(vendor);
        let mut slot = HostSlot::new();
        let mut v = V::new(vendor, 1);
        let (ctl, ctr) = gp_msrs(vendor, 1);
        let sel = if vendor == Vendor::Intel { INTEL_CYCLES } else { AMD_CYCLES };
        assert_eq!(v.write(&mut slot, &mut cpu, 0, ctr, 500), Access::Ok(500));
        assert_eq!(v.write(&mut slot, &mut cpu, 0, ctl, sel), Access::Ok(sel));
        assert!(v.pmu.counts_in_hardware());
        assert_eq!(v.hw.loaded_on(), Some(0), "loaded at once (the guest's slice goes on)");
        v.hw.slice_end(&mut v.pmu, &mut slot, &mut cpu);
        for _ in 0..3 {
            v.slice(&mut slot, &mut cpu, 0, 1000);
            // Between slices, nothing of the guest stays in the host's registers.
            assert_eq!((cpu.get(ctl), cpu.get(ctr)), (0, 0), "{vendor:?}");
            assert_eq!(v.hw.loaded_on(), None);
        }
        assert_eq!(v.read(&mut cpu, ctr), 3500, "{vendor:?}: the host's 7 + 11 per slice not counted");
        // While loaded, a read sees the live count.
        v.start(&mut slot, &mut cpu, 0);
        cpu.run(100, Some(v.switch.map_or(0, |s| s.guest)));
        assert_eq!(v.read(&mut cpu, ctr), 3600, "{vendor:?}");
        if vendor == Vendor::Intel {
            let s = v.switch.unwrap();
            assert_eq!((s.guest, s.host), (intel::gp_bit(1), 0), "only the live hardware counter");
        } else {
            assert_eq!(cpu.get(ctl), sel | amd::EventSelect::GUEST_ONLY, "AMD: GuestOnly in hardware");
        }
        v.hw.slice_end(&mut v.pmu, &mut slot, &mut cpu);
        // Disabled: the saved value stands still and nothing is loaded any more.
        v.write(&mut slot, &mut cpu, 0, ctl, 0);
        let before = cpu.traffic;
        v.slice(&mut slot, &mut cpu, 0, 1000);
        assert_eq!(cpu.traffic, before, "lazy again once disabled");
        assert_eq!(v.read(&mut cpu, ctr), 3600);
    }
}

#[test]
fn intel_fixed_counters_and_global_ctrl() {
    let mut cpu = FakeCpu::new(Vendor::Intel);
    let mut slot = HostSlot::new();
    let mut v = V::new(Vendor::Intel, 1);
    // Fixed counter 0 (instructions retired) with PMI, fixed 1 without; global enable.
    v.write(&mut slot, &mut cpu, 0, intel::IA32_FIXED_CTR_CTRL, 0x0B | 0x30);
    v.write(&mut slot, &mut cpu, 0, intel::IA32_PERF_GLOBAL_CTRL, intel::fixed_bit(0) | intel::fixed_bit(1));
    v.hw.slice_end(&mut v.pmu, &mut slot, &mut cpu);
    v.slice(&mut slot, &mut cpu, 0, 250);
    assert_eq!(v.switch.unwrap().guest, intel::fixed_bit(0) | intel::fixed_bit(1));
    assert_eq!(v.read(&mut cpu, intel::IA32_FIXED_CTR0), 250);
    assert_eq!(v.read(&mut cpu, intel::IA32_FIXED_CTR0 + 1), 250);
    assert_eq!(v.read(&mut cpu, intel::IA32_FIXED_CTR0 + 2), 0);
    assert_eq!(v.pmu.rdpmc(intel::rdpmc::FIXED), Some(250));
    // Globally disabled: the controls still exist but nothing counts.
    v.write(&mut slot, &mut cpu, 0, intel::IA32_PERF_GLOBAL_CTRL, 0);
    v.slice(&mut slot, &mut cpu, 0, 250);
    assert_eq!(v.read(&mut cpu, intel::IA32_FIXED_CTR0), 250);
}

#[test]
fn two_vcpus_on_one_host_cpu_never_see_each_others_counts() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut cpu = FakeCpu::new(vendor);
        let mut slot = HostSlot::new();
        let sel = if vendor == Vendor::Intel { INTEL_CYCLES } else { AMD_CYCLES };
        let (ctl, ctr) = gp_msrs(vendor, 0);
        // VM A counts; VM B's counter 0 holds a value but is disabled; VM C counts too.
        let (mut a, mut b, mut c) = (V::new(vendor, 1), V::new(vendor, 2), V::new(vendor, 3));
        a.write(&mut slot, &mut cpu, 0, ctl, sel);
        a.hw.slice_end(&mut a.pmu, &mut slot, &mut cpu);
        b.pmu.write(ctr, 42);
        c.pmu.write(ctl, sel);
        for round in 1..=4u64 {
            a.slice(&mut slot, &mut cpu, 0, 100);
            b.slice(&mut slot, &mut cpu, 0, 1000);
            c.slice(&mut slot, &mut cpu, 0, 10);
            assert_eq!(a.read(&mut cpu, ctr), 100 * round, "{vendor:?}");
            assert_eq!(b.read(&mut cpu, ctr), 42, "{vendor:?}: B's idle counter saw nobody's counts");
            assert_eq!(c.read(&mut cpu, ctr), 10 * round, "{vendor:?}");
            assert_eq!(slot.owner(), None);
        }
        // While A is loaded, the slot names it; the host LVTPC is masked meanwhile.
        a.start(&mut slot, &mut cpu, 0);
        assert_eq!(slot.owner(), Some(1));
        a.hw.slice_end(&mut a.pmu, &mut slot, &mut cpu);
    }
}

#[test]
fn migration_between_host_cpus() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut cpus = [FakeCpu::new(vendor), FakeCpu::new(vendor)];
        let mut slots = [HostSlot::new(), HostSlot::new()];
        let sel = if vendor == Vendor::Intel { INTEL_CYCLES } else { AMD_CYCLES };
        let (ctl, ctr) = gp_msrs(vendor, 2);
        let mut v = V::new(vendor, 9);
        let mut other = V::new(vendor, 10);
        other.pmu.write(ctl, sel);
        v.pmu.write(ctl, sel);
        v.pmu.write(ctr, COUNTER_MASK - 5000);
        for n in 0..6 {
            let h = n % 2;
            v.slice(&mut slots[h], &mut cpus[h], h, 1000);
            // Another VM's vCPU takes the CPU v just left.
            other.slice(&mut slots[h], &mut cpus[h], h, 3);
        }
        assert_eq!(v.read(&mut cpus[0], ctr), (COUNTER_MASK - 5000 + 6000) & COUNTER_MASK, "{vendor:?}");
        assert_eq!(other.read(&mut cpus[1], ctr), 18, "{vendor:?}");
        // The wrap on the way is an overflow (status on Intel; no INT: no PMI).
        if vendor == Vendor::Intel {
            assert_eq!(v.pmu.read(intel::IA32_PERF_GLOBAL_STATUS), Access::Ok(intel::gp_bit(2)));
        }
        assert!(!v.pmu.take_pmi());
        for c in &cpus {
            assert_eq!((c.get(ctl), c.get(ctr)), (0, 0));
            assert_eq!(c.lvtpc, HOST_LVTPC);
        }
    }
}

#[test]
fn overflow_with_int_raises_a_pmi() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut cpu = FakeCpu::new(vendor);
        let mut slot = HostSlot::new();
        let int = if vendor == Vendor::Intel { intel::EventSelect::INT } else { amd::EventSelect::INT };
        let sel = int | if vendor == Vendor::Intel { INTEL_CYCLES } else { AMD_CYCLES };
        let (ctl, ctr) = gp_msrs(vendor, 0);
        let mut v = V::new(vendor, 1);
        v.pmu.write(ctr, COUNTER_MASK - 99);
        v.pmu.write(ctl, sel);
        v.start(&mut slot, &mut cpu, 0);
        assert_eq!(cpu.get(ctl) & int, 0, "{vendor:?}: the host never takes the PMI itself");
        cpu.run(50, Some(v.switch.map_or(0, |s| s.guest)));
        v.hw.poll(&mut v.pmu, &mut cpu);
        assert!(!v.pmu.take_pmi());
        cpu.run(60, Some(v.switch.map_or(0, |s| s.guest)));
        v.hw.poll(&mut v.pmu, &mut cpu);
        assert!(v.pmu.take_pmi(), "{vendor:?}");
        assert_eq!(v.pmu.read(ctr), Access::Ok(10));
        v.hw.poll(&mut v.pmu, &mut cpu);
        assert!(!v.pmu.take_pmi(), "{vendor:?}: one overflow, one PMI");
        if vendor == Vendor::Intel {
            assert_eq!(cpu.get(intel::IA32_PERF_GLOBAL_OVF_CTRL), intel::gp_bit(0), "status cleared in hardware");
        }
        v.hw.slice_end(&mut v.pmu, &mut slot, &mut cpu);
    }
}

#[test]
fn host_lvtpc_masked_while_a_guest_counter_is_live() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut cpu = FakeCpu::new(vendor);
        let mut slot = HostSlot::new();
        let sel = if vendor == Vendor::Intel { INTEL_CYCLES } else { AMD_CYCLES };
        let mut v = V::new(vendor, 1);
        v.pmu.write(gp_msrs(vendor, 0).0, sel);
        v.start(&mut slot, &mut cpu, 0);
        assert_eq!(cpu.lvtpc, HOST_LVTPC | LVT_MASKED);
        // A reload (guest write) keeps the host's value, not the masked one.
        v.write(&mut slot, &mut cpu, 0, gp_msrs(vendor, 1).0, sel);
        assert_eq!(cpu.lvtpc, HOST_LVTPC | LVT_MASKED);
        v.hw.slice_end(&mut v.pmu, &mut slot, &mut cpu);
        assert_eq!(cpu.lvtpc, HOST_LVTPC);
        // An idle vCPU leaves the LVTPC alone.
        let mut idle = V::new(vendor, 2);
        idle.start(&mut slot, &mut cpu, 0);
        assert_eq!(cpu.lvtpc, HOST_LVTPC);
    }
}

#[test]
fn exit_events_stay_software_counters_next_to_hardware_ones() {
    let mut cpu = FakeCpu::new(Vendor::Amd);
    let mut slot = HostSlot::new();
    let mut v = V::new(Vendor::Amd, 1);
    let exits = AMD_CYCLES & !0xFF | 0x56;
    v.pmu.write(amd::PERF_CTL_BASE, exits);
    v.pmu.write(amd::PERF_CTL_BASE + 2, AMD_CYCLES);
    v.start(&mut slot, &mut cpu, 0);
    assert_eq!(cpu.get(amd::PERF_CTL_BASE), 0, "the exit counter is not in hardware");
    v.pmu.count_exit(0, 0);
    v.pmu.count_exit(1, 3);
    cpu.run(77, Some(0));
    assert_eq!(v.read(&mut cpu, amd::PERF_CTL_BASE + 1), 2);
    assert_eq!(v.read(&mut cpu, amd::PERF_CTL_BASE + 3), 77);
    // Cycles on the hardware path are the hardware's: Vireo adds no guest ticks.
    assert!(!v.pmu.counts_guest_time());
    v.hw.slice_end(&mut v.pmu, &mut slot, &mut cpu);
}

#[test]
fn a_hardware_counter_with_a_pmi_bounds_the_guest_run() {
    let mut p = Pmu::new(Vendor::Amd, true).with_hardware();
    let (ctl, ctr) = gp_msrs(Vendor::Amd, 0);
    p.write(ctr, COUNTER_MASK + 1 - 4_000_000);
    p.write(ctl, AMD_CYCLES);
    assert_eq!(p.ticks_to_overflow(), None, "no INT: nothing to be on time for");
    p.write(ctl, AMD_CYCLES | amd::EventSelect::INT);
    assert_eq!(p.ticks_to_overflow(), Some(1_000_000));
    p.write(ctr, COUNTER_MASK - 10);
    assert_eq!(p.ticks_to_overflow(), Some(MIN_POLL_TICKS));
}

#[test]
fn pmu_off_never_takes_the_hardware_path() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut p = Pmu::new(vendor, false).with_hardware();
        assert!(!p.hardware());
        let (ctl, _) = gp_msrs(vendor, 0);
        assert_eq!(p.write(ctl, if vendor == Vendor::Intel { INTEL_CYCLES } else { AMD_CYCLES }), Access::NotPmu);
        let mut cpu = FakeCpu::new(vendor);
        let mut slot = HostSlot::new();
        let mut hw = HwVcpu::default();
        assert_eq!(hw.slice_start(&p, &mut slot, &mut cpu, 0, 1), None);
        hw.slice_end(&mut p, &mut slot, &mut cpu);
        assert_eq!(cpu.traffic, 0);
    }
}
