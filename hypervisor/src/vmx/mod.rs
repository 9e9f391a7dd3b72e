//! Intel VMX backend (VMCS, EPT). See vmm::backend for the contract.
//!
//! * [`enable`]: VMX on for this CPU (IA32_FEATURE_CONTROL, CR0/CR4 fixed bits, VMXON).
//! * [`VmxVcpu`]: one vCPU; implements [`crate::vmm::Backend`].
//!
//! Layout: `vmcs` field encodings, `instr` the VMX instructions (each wrapped once),
//! `error` readable VM-instruction errors, `controls` control adjustment from the
//! capability MSRs, `cr` CR0/CR4 fixed bits, masks and MOV-to-CR emulation, `decode` exit
//! decoding, `check` the guest-state checks behind "invalid guest state", `msr_bitmap`,
//! `guest_mem` (EPT walk for PAE PDPTEs), `percpu` per-CPU VMX state, `run` the entry
//! trampoline, `vcpu` the vCPU itself. Everything but `instr`, `percpu`'s hardware half,
//! `run` and `vcpu`'s VMCS accesses is pure and unit-tested on the host.

pub mod check;
pub mod controls;
pub mod cr;
pub mod decode;
pub mod error;
pub mod guest_mem;
pub mod instr;
pub mod msr_bitmap;
pub mod percpu;
pub mod run;
pub mod vcpu;
pub mod vmcs;

pub use error::VmxFail;
pub use percpu::{disable, enable};
pub use vcpu::VmxVcpu;
