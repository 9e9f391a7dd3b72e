//! Vireo's hypercalls (`guest_abi::hypercall`): argument checks and results. Guest buffers
//! are reached only through `GuestMemory`'s checked helpers, so a bad pointer is -EFAULT,
//! never a fault in Vireo.

use guest_abi::hypercall::{errno, nr, CONSOLE_WRITE_MAX};

use super::{exit::EXIT_KINDS, guest_mem::GuestMemory, stats::ExitStats};

/// What the VM should do after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Return this value in RAX and continue after the instruction.
    Return(i64),
    /// The guest asked to end its VM with this status.
    Exit(u64),
}

/// Everything a hypercall may touch.
pub struct Context<'a> {
    pub mem: &'a GuestMemory,
    pub stats: &'a ExitStats,
    /// Where CONSOLE_WRITE bytes go.
    pub console: &'a mut dyn FnMut(&[u8]),
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
        nr::EXIT_STATS => {
            // Layout: EXIT_KINDS pairs of little-endian u64 (count, cycles), in
            // `ExitKind::index` order. Returns the number of pairs written.
            let (gpa, len) = (args[0], args[1]);
            let need = (EXIT_KINDS * 16) as u64;
            if len < need {
                return Return(-errno::E2BIG);
            }
            let mut bytes = [0u8; EXIT_KINDS * 16];
            for (i, c) in cx.stats.classes().iter().enumerate() {
                bytes[i * 16..i * 16 + 8].copy_from_slice(&c.count.to_le_bytes());
                bytes[i * 16 + 8..i * 16 + 16].copy_from_slice(&c.cycles.to_le_bytes());
            }
            match cx.mem.write(gpa, &bytes) {
                Ok(()) => Return(EXIT_KINDS as i64),
                Err(_) => Return(-errno::EFAULT),
            }
        }
        _ => Return(-errno::ENOSYS),
    }
}
