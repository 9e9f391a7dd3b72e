//! The KVM paravirtual interface (`guest_abi::kvm`; facts in Linux 6.1's
//! Documentation/virt/kvm/x86/{cpuid,msr,hypercalls}.rst): CPUID leaves, MSRs and
//! hypercalls. The vCPU run loop calls in here; what the MSRs register is acted on by
//! [`super::clock`], [`super::steal`] and the PV EOI handling in the run loop.
//!
//! Features offered are only the ones that work: CLOCKSOURCE2 (+ the stable bit when host
//! TSCs are synchronized), NOP_IO_DELAY, STEAL_TIME, PV_EOI, PV_UNHALT, PV_TLB_FLUSH,
//! PV_SEND_IPI, POLL_CONTROL, PV_SCHED_YIELD. Not offered: the old clock MSRs, async page
//! faults (Vireo never swaps guest memory), MSI extended destination IDs.
//!
//! Bad values: a reserved bit, or an enabled area that is not wholly inside the VM's RAM
//! (beyond its end, straddling it, or on MMIO), is #GP(0) and changes nothing (KVM also
//! faults for reserved bits and unmappable PV EOI areas; faulting for every unusable area
//! keeps a guest from believing in a clock or steal record nobody writes).

use guest_abi::kvm::{features as f, hc, hints, msr, pvclock, steal as st, LEAF_FEATURES, LEAF_SIGNATURE, SIGNATURE};

use super::{clock, Gp, VcpuPv, VmPv};
use crate::{
    devices::irq::{DeliveryMode, Destination, Message},
    vmm::{cpuid::CpuidRegs, guest_mem::GuestMemory},
};

/// The KVM leaves for a VM with `pv` (`None`: not a KVM leaf, or the VM offers none).
pub fn cpuid(leaf: u32, pv: &VmPv) -> Option<CpuidRegs> {
    if !pv.kvm() {
        return None;
    }
    match leaf {
        LEAF_SIGNATURE => {
            let [b, c, d] = SIGNATURE;
            Some(CpuidRegs { eax: LEAF_FEATURES, ebx: b, ecx: c, edx: d })
        }
        LEAF_FEATURES => Some(CpuidRegs { eax: features(pv), ebx: 0, ecx: 0, edx: hints_bits() }),
        _ => None,
    }
}

/// CPUID 0x4000_0001 EAX.
pub fn features(pv: &VmPv) -> u32 {
    let mut bits = f::CLOCKSOURCE2
        | f::NOP_IO_DELAY
        | f::STEAL_TIME
        | f::PV_EOI
        | f::PV_UNHALT
        | f::PV_TLB_FLUSH
        | f::PV_SEND_IPI
        | f::POLL_CONTROL
        | f::PV_SCHED_YIELD;
    if pv.tsc_stable {
        bits |= f::CLOCKSOURCE_STABLE_BIT;
    }
    bits
}

/// CPUID 0x4000_0001 EDX: no REALTIME hint (vCPUs share host CPUs and are preempted).
fn hints_bits() -> u32 {
    let _ = hints::REALTIME;
    0
}

/// Whether `msr` is one of the KVM MSRs this VM offers.
pub fn is_pv_msr(pv: &VmPv, index: u32) -> bool {
    pv.kvm()
        && matches!(
            index,
            msr::WALL_CLOCK_NEW | msr::SYSTEM_TIME_NEW | msr::STEAL_TIME | msr::PV_EOI_EN | msr::POLL_CONTROL
        )
}

/// RDMSR of a KVM MSR (after [`is_pv_msr`]): the value last written.
pub fn rdmsr(v: &VcpuPv, wall_clock_msr: u64, index: u32) -> u64 {
    match index {
        msr::WALL_CLOCK_NEW => wall_clock_msr,
        msr::SYSTEM_TIME_NEW => v.system_time_msr,
        msr::STEAL_TIME => v.steal_msr,
        msr::PV_EOI_EN => v.pv_eoi_msr,
        msr::POLL_CONTROL => v.poll_control_msr,
        _ => 0,
    }
}

/// What a successful KVM MSR write asks the vCPU to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrEffect {
    None,
    /// The steal-time area was (re)enabled: publish the figures now.
    StealEnabled,
    /// The wall-clock MSR was written (the value to read back).
    WallClock(u64),
}

/// WRMSR of a KVM MSR (after [`is_pv_msr`]). `Err(Gp)` is #GP(0), with nothing changed.
pub fn wrmsr(
    pv: &VmPv,
    mem: &GuestMemory,
    v: &mut VcpuPv,
    start_tsc: u64,
    index: u32,
    value: u64,
) -> Result<MsrEffect, Gp> {
    let in_ram = |gpa: u64, len: usize| if mem.contains(gpa, len as u64) { Ok(()) } else { Err(Gp) };
    match index {
        msr::WALL_CLOCK_NEW => {
            in_ram(value, pvclock::WALL_CLOCK_SIZE)?;
            clock::write_wall_clock(mem, value, pv.wall_at_start_ns).map_err(|_| Gp)?;
            Ok(MsrEffect::WallClock(value))
        }
        msr::SYSTEM_TIME_NEW => {
            if value & msr::ENABLED != 0 {
                let gpa = value & !1;
                in_ram(gpa, pvclock::SIZE)?;
                let info = clock::TimeInfo::for_vm(start_tsc, pv.tsc_hz, pv.tsc_stable).ok_or(Gp)?;
                clock::write(mem, gpa, &info).map_err(|_| Gp)?;
            }
            v.system_time_msr = value;
            Ok(MsrEffect::None)
        }
        msr::STEAL_TIME => {
            if value & msr::STEAL_RESERVED != 0 {
                return Err(Gp);
            }
            let enable = value & msr::ENABLED != 0;
            if enable {
                in_ram(value & !0x3F, st::SIZE)?;
            }
            v.steal_msr = value;
            Ok(if enable { MsrEffect::StealEnabled } else { MsrEffect::None })
        }
        msr::PV_EOI_EN => {
            if value & msr::PV_EOI_RESERVED != 0 {
                return Err(Gp);
            }
            if value & msr::ENABLED != 0 {
                in_ram(value & !0x3, 4)?;
            }
            v.pv_eoi_msr = value;
            v.eoi_offered = None;
            Ok(MsrEffect::None)
        }
        msr::POLL_CONTROL => {
            // Bit 0: the guest allows host-side halt polling. Vireo does not poll; the value
            // is kept for reads.
            if value & !1 != 0 {
                return Err(Gp);
            }
            v.poll_control_msr = value;
            Ok(MsrEffect::None)
        }
        _ => Err(Gp),
    }
}

/// What a KVM hypercall asks the run loop to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// Put this in RAX and go on.
    Return(i64),
    /// Put this in RAX and give the host CPU to another vCPU (directed yield).
    Yield(i64),
    /// Wake vCPU n from a PV-spinlock HLT; return 0.
    Kick(usize),
    /// Send `msg` to the vCPUs in the mask; return how many.
    SendIpi(u64, Message),
}

/// Decodes KVM hypercall `number` with `args` from CPL `cpl` on a VM of `vcpus` vCPUs
/// (APIC ID = vCPU index). `None`: not a KVM hypercall (Vireo's own numbers).
pub fn hypercall(pv: &VmPv, number: u64, args: [u64; 4], cpl: u8, vcpus: usize) -> Option<Hypercall> {
    use Hypercall::Return;
    if number >= guest_abi::hypercall::BASE {
        return None;
    }
    if !pv.kvm() {
        return Some(Return(-hc::ENOSYS));
    }
    if cpl != 0 {
        return Some(Return(-hc::EPERM));
    }
    Some(match number {
        // The old "poll for interrupts" call: nothing to do.
        hc::VAPIC_POLL_IRQ => Return(0),
        hc::KICK_CPU => match usize::try_from(args[1]) {
            Ok(n) if n < vcpus => Hypercall::Kick(n),
            _ => Return(0),
        },
        hc::SEND_IPI => send_ipi(args, vcpus),
        hc::SCHED_YIELD => Hypercall::Yield(0),
        hc::CLOCK_PAIRING => Return(-hc::EOPNOTSUPP),
        _ => Return(-hc::ENOSYS),
    })
}

/// PV SEND_IPI: RBX/RCX a 128-bit map of destinations, RDX the APIC ID of bit 0, RSI the
/// ICR's low half. The ICR may name only a vector and a delivery mode (Fixed or NMI; what
/// Linux sends): destination-mode and shorthand bits are -EINVAL, as in KVM.
fn send_ipi(args: [u64; 4], vcpus: usize) -> Hypercall {
    const DEST_LOGICAL: u64 = 1 << 11;
    const SHORTHAND: u64 = 3 << 18;
    let [low, high, min, icr] = args;
    if icr & (DEST_LOGICAL | SHORTHAND) != 0 {
        return Hypercall::Return(-hc::EINVAL);
    }
    let mode = match DeliveryMode::from_icr_bits(((icr >> 8) & 7) as u8, true, false) {
        Some(m @ (DeliveryMode::Fixed | DeliveryMode::Nmi)) => m,
        _ => return Hypercall::Return(-hc::EINVAL),
    };
    let vector = icr as u8;
    if mode == DeliveryMode::Fixed && vector < 16 {
        return Hypercall::Return(-hc::EINVAL);
    }
    let mut mask = 0u64;
    for (word, base) in [(low, 0u64), (high, 64)] {
        for bit in 0..64 {
            if word & (1 << bit) == 0 {
                continue;
            }
            if let Some(id) = min.checked_add(base + bit) {
                if id < vcpus as u64 && id < 64 {
                    mask |= 1 << id;
                }
            }
        }
    }
    let msg = Message { mode, vector, level_assert: true, trigger_level: false, dest: Destination::Physical(0) };
    Hypercall::SendIpi(mask, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mm::frame::FrameAllocator, pv::PvMode};

    fn kvm_pv() -> VmPv {
        VmPv { mode: PvMode::Kvm, tsc_stable: true, tsc_hz: 1_000_000_000, ..VmPv::default() }
    }

    #[test]
    fn leaves_only_with_pv_kvm() {
        let pv = kvm_pv();
        let sig = cpuid(LEAF_SIGNATURE, &pv).unwrap();
        assert_eq!([sig.ebx, sig.ecx, sig.edx], SIGNATURE);
        assert_eq!(sig.eax, LEAF_FEATURES);
        let feat = cpuid(LEAF_FEATURES, &pv).unwrap();
        for bit in [f::CLOCKSOURCE2, f::STEAL_TIME, f::PV_EOI, f::PV_UNHALT, f::PV_SEND_IPI, f::CLOCKSOURCE_STABLE_BIT]
        {
            assert_ne!(feat.eax & bit, 0, "{bit:#x}");
        }
        assert_eq!(feat.eax & (f::CLOCKSOURCE | f::ASYNC_PF | f::ASYNC_PF_INT | f::MSI_EXT_DEST_ID), 0);
        assert_eq!(feat.edx & hints::REALTIME, 0);
        let unstable = VmPv { tsc_stable: false, ..kvm_pv() };
        assert_eq!(features(&unstable) & f::CLOCKSOURCE_STABLE_BIT, 0);
        assert_eq!(cpuid(LEAF_SIGNATURE, &VmPv::default()), None);
        assert!(!is_pv_msr(&VmPv::default(), msr::SYSTEM_TIME_NEW));
        assert!(is_pv_msr(&pv, msr::SYSTEM_TIME_NEW));
        assert!(!is_pv_msr(&pv, msr::ASYNC_PF_EN), "async PF is not offered");
    }

    #[test]
    fn msr_writes_validate_areas() {
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let pv = kvm_pv();
        let mut v = VcpuPv::default();
        let end = mem.size();
        // kvmclock: in RAM is fine and written at once; straddling the end or MMIO is #GP.
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::SYSTEM_TIME_NEW, 0x1000 | 1), Ok(MsrEffect::None));
        assert_eq!(v.system_time(), Some(0x1000));
        assert_eq!(mem.read_u64(0x1000).unwrap() & 0xFFFF_FFFF, 2);
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::SYSTEM_TIME_NEW, (end - 16) | 1), Err(Gp));
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::SYSTEM_TIME_NEW, 0xFEE0_0001), Err(Gp));
        assert_eq!(rdmsr(&v, 0, msr::SYSTEM_TIME_NEW), 0x1001, "a refused write changes nothing");
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::SYSTEM_TIME_NEW, 0), Ok(MsrEffect::None));
        assert_eq!(v.system_time(), None);
        // Steal time: 64-byte aligned (bits 5:1 reserved), wholly in RAM.
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::STEAL_TIME, 0x2000 | 1), Ok(MsrEffect::StealEnabled));
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::STEAL_TIME, 0x2008 | 1), Err(Gp), "misaligned");
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::STEAL_TIME, (end - 32) | 1), Err(Gp), "straddles the end");
        assert_eq!(v.steal(), Some(0x2000));
        // PV EOI: bit 1 reserved, 4 bytes in RAM.
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::PV_EOI_EN, 0x3000 | 1), Ok(MsrEffect::None));
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::PV_EOI_EN, 0x3000 | 3), Err(Gp));
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::PV_EOI_EN, end | 1), Err(Gp));
        assert_eq!(v.pv_eoi(), Some(0x3000));
        // Poll control: only bit 0.
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::POLL_CONTROL, 1), Ok(MsrEffect::None));
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::POLL_CONTROL, 2), Err(Gp));
        // Wall clock.
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::WALL_CLOCK_NEW, 0x4000), Ok(MsrEffect::WallClock(0x4000)));
        assert_eq!(wrmsr(&pv, &mem, &mut v, 0, msr::WALL_CLOCK_NEW, end - 4), Err(Gp));
    }

    #[test]
    fn hypercalls() {
        let pv = kvm_pv();
        let call = |n, a: [u64; 4], cpl| hypercall(&pv, n, a, cpl, 4);
        assert_eq!(call(guest_abi::hypercall::nr::PING, [0; 4], 0), None, "Vireo's own numbers");
        assert_eq!(call(hc::KICK_CPU, [0, 2, 0, 0], 3), Some(Hypercall::Return(-hc::EPERM)));
        assert_eq!(call(hc::KICK_CPU, [0, 2, 0, 0], 0), Some(Hypercall::Kick(2)));
        assert_eq!(call(hc::KICK_CPU, [0, 9, 0, 0], 0), Some(Hypercall::Return(0)), "no such vCPU");
        assert_eq!(call(hc::SCHED_YIELD, [1, 0, 0, 0], 0), Some(Hypercall::Yield(0)));
        assert_eq!(call(99, [0; 4], 0), Some(Hypercall::Return(-hc::ENOSYS)));
        assert_eq!(call(hc::CLOCK_PAIRING, [0; 4], 0), Some(Hypercall::Return(-hc::EOPNOTSUPP)));
        // SEND_IPI: vCPUs 1 and 3 (bits 0 and 2 from APIC ID 1), vector 0xF0; ID 5 does not exist.
        match call(hc::SEND_IPI, [0b10101, 0, 1, 0xF0], 0) {
            Some(Hypercall::SendIpi(mask, msg)) => {
                assert_eq!(mask, 0b1010);
                assert_eq!((msg.mode, msg.vector), (DeliveryMode::Fixed, 0xF0));
            }
            other => panic!("{other:?}"),
        }
        match call(hc::SEND_IPI, [1, 0, 0, 0x400], 0) {
            Some(Hypercall::SendIpi(1, msg)) => assert_eq!(msg.mode, DeliveryMode::Nmi),
            other => panic!("{other:?}"),
        }
        assert_eq!(call(hc::SEND_IPI, [1, 0, 0, 0xF0 | (1 << 11)], 0), Some(Hypercall::Return(-hc::EINVAL)));
        assert_eq!(call(hc::SEND_IPI, [1, 0, 0, 0xF0 | (3 << 18)], 0), Some(Hypercall::Return(-hc::EINVAL)));
        assert_eq!(call(hc::SEND_IPI, [1, 0, 0, 0x500], 0), Some(Hypercall::Return(-hc::EINVAL)), "INIT");
        assert_eq!(call(hc::SEND_IPI, [1, 0, u64::MAX, 0xF0], 0), Some(Hypercall::SendIpi(0, call_msg(0xF0))));
        // With pv=off, KVM's numbers do not exist.
        assert_eq!(hypercall(&VmPv::default(), hc::KICK_CPU, [0; 4], 0, 4), Some(Hypercall::Return(-hc::ENOSYS)));
    }

    fn call_msg(vector: u8) -> Message {
        Message {
            mode: DeliveryMode::Fixed,
            vector,
            level_assert: true,
            trigger_level: false,
            dest: Destination::Physical(0),
        }
    }
}
