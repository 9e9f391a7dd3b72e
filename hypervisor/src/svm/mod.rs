//! AMD SVM backend (VMCB, NPT). See vmm::backend for the contract.
//!
//! AMD64 Architecture Programmer's Manual Vol. 2, chapter 15 ("Secure Virtual Machine").
//!
//! * [`enable`] turns SVM on for this CPU (EFER.SVME, VM_HSAVE_PA, host-state page).
//! * [`SvmVcpu`] is one guest CPU: a VMCB ([`vmcb`]), an I/O permission map intercepting
//!   every port and an MSR permission map intercepting every MSR except the ones
//!   VMLOAD/VMSAVE switch ([`bitmap::PASS_THROUGH_MSRS`]); nested paging always on.
//! * [`decode`] turns #VMEXIT codes into [`crate::vmm::ExitKind`]; [`event`] encodes
//!   EVENTINJ and re-queues interrupted deliveries; [`check`] names the consistency check
//!   behind a VMEXIT_INVALID; [`run`] is the world switch (assembly on bare metal).
//!
//! Vireo hides SVM from its guests: the SVM instructions (VMRUN, VMLOAD, VMSAVE, STGI,
//! CLGI, SKINIT, INVLPGA) and RDPRU exit and are reported as #UD exceptions.
//!
//! Every intercepted instruction's next RIP comes from nRIP-save where the CPU has it
//! (Bochs, hardware), from EXITINFO2 for port I/O, and from the instruction's known
//! length otherwise (QEMU TCG has no nRIP-save).

pub mod bitmap;
pub mod check;
pub mod decode;
pub mod event;
pub mod run;
pub mod vcpu;
pub mod vmcb;

pub use vcpu::{enable, SvmVcpu, MSR_VM_HSAVE_PA};

#[cfg(test)]
mod tests;
