//! Paravirtual interfaces: what a guest that knows it runs on Vireo can ask for.
//!
//! - [`kvm`]: the KVM paravirtual interface (`pv=kvm` on the VM line, the default for Linux
//!   VMs), so an unmodified distribution kernel uses kvmclock, steal time with the
//!   preempted flag, PV EOI, PV spinlocks (unhalt + KICK_CPU), PV IPIs, PV TLB flush and
//!   directed yield. Its shared-memory areas are written by [`clock`] and [`steal`].
//! - [`page`]: Vireo's own ABI version 2 hypercall page (every VM).
//!
//! The per-VM switches and VM-wide state are [`VmPv`]; a vCPU's registrations are
//! [`VcpuPv`], touched only by the host CPU running that vCPU.

pub mod clock;
pub mod kvm;
pub mod page;
pub mod steal;

use core::sync::atomic::AtomicU64;

/// A guest MSR write the architecture refuses: the vCPU gets #GP(0) and nothing changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gp;

/// Which paravirtual interface a VM offers at CPUID 0x4000_0000 (`pv=` on the VM line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PvMode {
    /// None: CPUID 0x4000_0000 is empty and the KVM MSRs and hypercalls fault or fail like
    /// on a machine without them. Vireo's own leaves and hypercalls stay.
    #[default]
    Off,
    /// The KVM paravirtual interface.
    Kvm,
}

impl PvMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(PvMode::Off),
            "kvm" => Some(PvMode::Kvm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PvMode::Off => "off",
            PvMode::Kvm => "kvm",
        }
    }
}

/// A VM's paravirtual switches and VM-wide state.
#[derive(Debug, Default)]
pub struct VmPv {
    pub mode: PvMode,
    /// The TSC is synchronized across host CPUs (and so across vCPUs, which run on the host
    /// TSC): pvclock may carry its TSC-stable flag.
    pub tsc_stable: bool,
    /// The TSC rate, for pvclock's scale.
    pub tsc_hz: u64,
    /// The Unix time (ns) at the VM's guest time 0, for the KVM wall clock.
    pub wall_at_start_ns: u64,
    /// The hypercall page MSR's value (`guest_abi::hypercall::page`).
    pub hypercall_page: AtomicU64,
}

impl VmPv {
    pub fn kvm(&self) -> bool {
        self.mode == PvMode::Kvm
    }
}

/// What one vCPU registered through the KVM MSRs (guest-physical addresses of its areas),
/// and the PV EOI offer in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuPv {
    /// MSR values as the guest wrote them (read back verbatim).
    pub system_time_msr: u64,
    pub steal_msr: u64,
    pub pv_eoi_msr: u64,
    pub poll_control_msr: u64,
    /// The vector whose EOI the guest may skip now (Vireo set the guest's PV EOI flag for
    /// it before the entry); checked after every exit.
    pub eoi_offered: Option<u8>,
}

impl VcpuPv {
    /// The enabled areas: (GPA of the pvclock, of the steal-time record, of the PV EOI word).
    pub fn system_time(&self) -> Option<u64> {
        enabled(self.system_time_msr, !0x1)
    }

    pub fn steal(&self) -> Option<u64> {
        enabled(self.steal_msr, !0x3F)
    }

    pub fn pv_eoi(&self) -> Option<u64> {
        enabled(self.pv_eoi_msr, !0x3)
    }
}

fn enabled(msr: u64, mask: u64) -> Option<u64> {
    (msr & guest_abi::kvm::msr::ENABLED != 0).then_some(msr & mask)
}
