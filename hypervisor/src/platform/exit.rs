//! Ending a run: the final `vireo: exit status=...` line, then the configured exit method.
//!
//! Under an emulator the method ends the emulator with a status the run scripts check:
//! QEMU's `isa-debug-exit` device (writing v to port 0xF4 exits QEMU with (v << 1) | 1) or
//! Bochs's shutdown port 0x8900 (the bytes "Shutdown"). On bare metal Vireo halts.

use core::sync::atomic::{AtomicU8, Ordering};

use x86_64::instructions::port::Port;

use crate::{arch::halt_forever, bootinfo::cmdline::ExitMethod, report};

const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

static METHOD: AtomicU8 = AtomicU8::new(ExitMethod::Halt as u8);

pub fn set_method(method: ExitMethod) {
    METHOD.store(method as u8, Ordering::Relaxed);
}

fn method() -> ExitMethod {
    match METHOD.load(Ordering::Relaxed) {
        m if m == ExitMethod::Qemu as u8 => ExitMethod::Qemu,
        m if m == ExitMethod::Bochs as u8 => ExitMethod::Bochs,
        _ => ExitMethod::Halt,
    }
}

/// Nothing left to run: report success and stop.
pub fn success() -> ! {
    report!("exit status=ok");
    stop(0)
}

/// A fatal error: report it and stop.
pub fn fail(reason: &str) -> ! {
    report!("exit status=fail reason=\"{reason}\"");
    stop(1)
}

fn stop(code: u8) -> ! {
    crate::console::serial::flush();
    match method() {
        // SAFETY: port 0xF4 is QEMU's isa-debug-exit device, added by the run scripts with
        // exit=qemu; on other machines the key is not set.
        ExitMethod::Qemu => unsafe { Port::<u8>::new(QEMU_DEBUG_EXIT_PORT).write(code) },
        ExitMethod::Bochs => {
            let mut port = Port::<u8>::new(BOCHS_SHUTDOWN_PORT);
            for b in b"Shutdown" {
                // SAFETY: Bochs's shutdown port, selected by exit=bochs.
                unsafe { port.write(*b) };
            }
        }
        ExitMethod::Halt => {}
    }
    halt_forever()
}
