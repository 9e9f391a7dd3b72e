//! COM1 through the `uart_16550` crate.

use core::fmt;
use spin::Mutex;
use uart_16550::{backend::PioBackend, BaudRate, Config, Uart16550};

/// The PC's first serial port (I/O base 0x3F8), where all of Vireo's output goes.
pub const COM1_BASE: u16 = 0x3F8;

/// The console: the UART if it initialised, otherwise a sink (output is dropped).
pub struct Console {
    uart: Option<Uart16550<PioBackend>>,
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(uart) = self.uart.as_mut() {
            uart.send_bytes_exact(s.as_bytes());
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

/// Programs COM1 for 115200 8N1. Safe to call again (e.g. after a crash).
pub fn init() {
    // SAFETY: 0x3F8..0x3FF is COM1 on every PC platform Vireo supports; Vireo owns the
    // port for its whole lifetime and only touches it through CONSOLE.
    let uart = unsafe { Uart16550::new_port(COM1_BASE) };
    let mut console = CONSOLE.lock();
    console.uart = uart.ok().and_then(|mut u| {
        let config = Config { baud_rate: BaudRate::Baud115200, ..Config::DEFAULT };
        u.init(config).ok().map(|_| u)
    });
}

/// Waits (bounded) until the UART has shifted out every byte, so nothing is lost when the
/// machine is switched off right after (emulators end at once on their exit ports).
pub fn flush() {
    use uart_16550::spec::registers::LSR;
    with_console(|c| {
        if let Some(uart) = c.uart.as_mut() {
            // ~10 ms at 115200 baud covers a full 16-byte FIFO; the bound keeps a missing or
            // wedged UART from hanging Vireo.
            for _ in 0..1_000_000 {
                if uart.lsr().contains(LSR::TRANSMITTER_EMPTY) {
                    break;
                }
                core::hint::spin_loop();
            }
        }
    });
}

/// A byte typed on Vireo's console, if one is waiting (never blocks).
pub fn try_read_byte() -> Option<u8> {
    with_console(|c| c.uart.as_mut().and_then(|u| u.try_receive_byte().ok()))
}

/// Runs `f` with the console locked.
pub fn with_console<R>(f: impl FnOnce(&mut Console) -> R) -> R {
    f(&mut CONSOLE.lock())
}

/// Takes the console even if its lock is held: only for the crash path. Another CPU may be
/// in the middle of a line, so the lock is first waited for a bounded time (a few
/// milliseconds of console output); a holder that never lets go (this same CPU,
/// interrupted by the fault) is then overridden.
pub fn force_unlock() {
    for _ in 0..2_000_000 {
        if !CONSOLE.is_locked() {
            return;
        }
        core::hint::spin_loop();
    }
    if CONSOLE.is_locked() {
        // SAFETY: called only on the fatal path with interrupts off; the holder is either
        // this CPU (interrupted by the fault, never resumes) or a CPU that kept it for far
        // longer than any line takes. At worst a line is mixed into the crash dump.
        unsafe { CONSOLE.force_unlock() };
    }
}
