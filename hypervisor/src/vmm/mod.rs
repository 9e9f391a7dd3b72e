//! The vendor-neutral virtual-machine monitor: guest state, the exit type, the backend
//! interface, and (in `vcpu`) the one run loop and exit dispatch both vendors share.

pub mod backend;
pub mod cpuid;
pub mod exit;
pub mod fast;
pub mod guest_mem;
pub mod hypercall;
pub mod injections;
pub mod launch;
pub mod mmio;
pub mod msr;
pub mod regs;
pub mod spec;
pub mod state;
pub mod stats;
pub mod string_io;
pub mod vcpu;
pub mod vm;
pub mod walk;

pub use backend::{Backend, BackendError};
pub use exit::{Event, Exit, ExitKind};
pub use regs::GuestRegs;
pub use state::CpuState;
