//! COM1 through the `uart_16550` crate, behind an output ring that an idle CPU drains.
//!
//! All of Vireo's output (its own lines and its VMs' guest lines) goes through one path: a
//! writer holds [`CONSOLE`] (the line lock) for a whole line and appends it to [`RING`];
//! whoever holds [`TX`] (the UART) moves bytes from the ring to the UART in order. So lines
//! never interleave (one writer appends at a time) and output keeps its order (one consumer
//! at a time takes the oldest bytes).
//!
//! Who writes the ring to the UART: a scheduler CPU with nothing to run registers as the
//! idle drainer ([`idle_claim`], from `sched::idle`) and writes the ring out while it
//! idles, so a vCPU whose guest prints a line does not wait for the UART. When no drainer
//! is registered (one CPU, all busy, before the scheduler), when the ring is full, after a
//! crash and at Vireo's exit, the writer drains the ring itself, inline, as it would write
//! the UART directly.
//!
//! Lock order: [`CONSOLE`] before [`TX`]. A writer may take TX while holding CONSOLE (to
//! drain inline); the drainer, the input poll and flush take TX without CONSOLE, and nothing
//! takes CONSOLE while holding TX.
//!
//! No byte is stranded in the ring (Dekker-style, every access below `SeqCst`): a writer
//! stores the ring's tail (in `ByteRing::push`) and then loads [`DRAINER`]; the drainer
//! stores DRAINER (halted, or gone) and then loads the ring's indices. In the single total
//! order of these `SeqCst` accesses, one of the two stores comes first, so at least one side
//! sees the other's: either the writer sees the drainer halted (and wakes it with an IPI) or
//! gone (and drains inline), or the drainer sees the bytes (and drains them instead of
//! halting or before it leaves). A writer that sees the drainer active leaves the bytes to
//! it: any later store of the drainer (halted or gone) comes after the writer's load, so
//! after its tail store, and the load that follows it sees the bytes.

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use spin::Mutex;
use uart_16550::{backend::PioBackend, BaudRate, Config, Uart16550};

use super::ring::ByteRing;

/// The PC's first serial port (I/O base 0x3F8), where all of Vireo's output goes.
pub const COM1_BASE: u16 = 0x3F8;

/// Output waiting for the UART: about 1.4 s of it at 115200 baud on a real port.
const RING_BYTES: usize = 16 * 1024;
/// Bytes written to the UART per hold of TX (about 22 ms at 115200 baud on a real port).
const DRAIN_CHUNK: usize = 256;

/// A handle for writing one line: it exists only while [`CONSOLE`] is held.
pub struct Console {
    _line_lock_held: (),
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            // SAFETY: a `Console` is only reachable through the CONSOLE lock, so this is the
            // ring's only producer.
            let n = unsafe { RING.push(bytes) };
            bytes = &bytes[n..];
            if !bytes.is_empty() {
                // Full: make room as the UART takes the oldest bytes (CONSOLE -> TX).
                drain_all();
            }
        }
        Ok(())
    }
}

/// The line lock: held by a writer for a whole line.
static CONSOLE: Mutex<Console> = Mutex::new(Console { _line_lock_held: () });
/// The UART if it initialised, otherwise `None` (output is dropped): held to write it.
static TX: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);
static RING: ByteRing<RING_BYTES> = ByteRing::new();
/// The idle drainer: [`NO_DRAINER`], or its local APIC ID shifted left once, with bit 0 set
/// while it is halted (or about to halt) and needs an IPI to see new bytes.
static DRAINER: AtomicU64 = AtomicU64::new(NO_DRAINER);
const NO_DRAINER: u64 = u64::MAX;
const HALTED: u64 = 1;
/// Set on the crash path and at exit: every line is written out before its writer goes on.
static SYNC: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1. Safe to call again (e.g. after a crash).
pub fn init() {
    // SAFETY: 0x3F8..0x3FF is COM1 on every PC platform Vireo supports; Vireo owns the
    // port for its whole lifetime and only touches it through TX.
    let uart = unsafe { Uart16550::new_port(COM1_BASE) };
    let mut tx = TX.lock();
    *tx = uart.ok().and_then(|mut u| {
        let config = Config { baud_rate: BaudRate::Baud115200, ..Config::DEFAULT };
        u.init(config).ok().map(|_| u)
    });
}

/// Writes ring bytes to the UART (dropping them without one), at most `max`, oldest first;
/// returns whether the ring is empty now. The caller holds TX.
fn drain(tx: &mut Option<Uart16550<PioBackend>>, max: usize) -> bool {
    let mut left = max;
    while left > 0 {
        // SAFETY: the caller holds TX, so this is the ring's only consumer.
        let n = unsafe {
            RING.consume(left, |bytes| {
                if let Some(uart) = tx.as_mut() {
                    uart.send_bytes_exact(bytes);
                }
            })
        };
        if n == 0 {
            return true;
        }
        left -= n;
    }
    RING.is_empty()
}

/// Writes the ring out in pieces of at most [`DRAIN_CHUNK`] bytes, taking TX for each: a CPU
/// that needs the UART meanwhile (a writer with a full ring, the input poll, the crash path's
/// bounded wait) waits for one piece, not for the whole ring.
fn drain_all() {
    while !drain(&mut TX.lock(), DRAIN_CHUNK) {}
}

/// After a writer's line: has it written out, unless an idle drainer will (see the module
/// comment for why no byte is stranded). The caller holds CONSOLE.
fn line_done() {
    if SYNC.load(SeqCst) {
        drain_all();
        return;
    }
    let d = DRAINER.load(SeqCst);
    if d == NO_DRAINER {
        drain_all();
    } else if d & HALTED != 0 && DRAINER.compare_exchange(d, d & !HALTED, SeqCst, SeqCst).is_ok() {
        // One IPI per halt of the drainer (the exchange's winner sends it). One that cannot
        // be sent leaves the bytes to the drainer's next wake-up (its timer, a kick) or exit;
        // inline draining would do as well, but a missing APIC has no idle drainer anyway.
        if crate::arch::lapic::send_wake((d >> 1) as u32).is_err() {
            drain_all();
        }
    }
    // Otherwise the drainer is active: it sees the bytes before it halts or leaves.
}

/// Registers this CPU (local APIC ID `apic_id`) as the idle drainer unless another CPU is
/// one; returns whether it is now. It must then call [`idle_drain`] before each halt, and
/// [`idle_release`] before it runs anything else. It never writes to the console itself
/// while registered (it would not wake itself).
pub fn idle_claim(apic_id: u32) -> bool {
    if SYNC.load(SeqCst) {
        return false;
    }
    DRAINER.compare_exchange(NO_DRAINER, (apic_id as u64) << 1, SeqCst, SeqCst).is_ok()
}

/// The registered drainer, before it halts: writes the ring out and marks itself halted.
/// Returns whether it may halt now; if not (bytes came meanwhile), it calls this again.
pub fn idle_drain(apic_id: u32) -> bool {
    drain_all();
    let me = (apic_id as u64) << 1;
    DRAINER.store(me | HALTED, SeqCst);
    if RING.is_empty() {
        return true;
    }
    DRAINER.store(me, SeqCst);
    false
}

/// The registered drainer, after its halt: active again (writers wake it no more).
pub fn idle_awake(apic_id: u32) {
    DRAINER.store((apic_id as u64) << 1, SeqCst);
}

/// Whether output is waiting in the ring.
pub fn pending() -> bool {
    !RING.is_empty()
}

/// The registered drainer leaves idle: unregisters, then writes out what writers left to it
/// meanwhile (they saw it registered), so nothing waits for the next idle CPU.
pub fn idle_release() {
    DRAINER.store(NO_DRAINER, SeqCst);
    if !RING.is_empty() {
        drain_all();
    }
}

/// Writes everything waiting out and waits (bounded) until the UART has shifted out every
/// byte, so nothing is lost when the machine is switched off right after (emulators end at
/// once on their exit ports). Later output is written out by its writer.
pub fn flush() {
    use uart_16550::spec::registers::LSR;
    SYNC.store(true, SeqCst);
    // The line lock first: a line being written is finished (and drained by its writer).
    let _line = CONSOLE.lock();
    let mut tx = TX.lock();
    drain(&mut tx, usize::MAX);
    if let Some(uart) = tx.as_mut() {
        // ~10 ms at 115200 baud covers a full 16-byte FIFO; the bound keeps a missing or
        // wedged UART from hanging Vireo.
        for _ in 0..1_000_000 {
            if uart.lsr().contains(LSR::TRANSMITTER_EMPTY) {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// A byte typed on Vireo's console, if one is waiting (never blocks).
pub fn try_read_byte() -> Option<u8> {
    TX.lock().as_mut().and_then(|u| u.try_receive_byte().ok())
}

/// Runs `f` with the console locked: what it writes is one unit (a line), never interleaved
/// with another writer's.
pub fn with_console<R>(f: impl FnOnce(&mut Console) -> R) -> R {
    let mut c = CONSOLE.lock();
    let r = f(&mut c);
    line_done();
    r
}

/// Waits a bounded time (a few milliseconds of console output) for `lock` to be free, then
/// overrides a holder that never lets go.
fn take_over<T>(lock: &Mutex<T>) {
    for _ in 0..2_000_000 {
        if !lock.is_locked() {
            return;
        }
        core::hint::spin_loop();
    }
    if lock.is_locked() {
        // SAFETY: called only on the fatal path with interrupts off; the holder is either
        // this CPU (interrupted by the fault, never resumes) or a CPU that kept it for far
        // longer than any line takes. At worst a line is mixed into the crash dump (or the
        // ring sees two producers or consumers for a moment: garbled bytes, no out-of-bounds
        // access, as every index is reduced modulo the ring's size).
        unsafe { lock.force_unlock() };
    }
}

/// Takes the console even if its locks are held: only for the crash path. Another CPU may
/// be in the middle of a line, so each lock is first waited for; a holder that never lets go
/// (this same CPU, interrupted by the fault) is then overridden. From here on every line is
/// written out at once, and what was waiting in the ring goes out first.
pub fn force_unlock() {
    SYNC.store(true, SeqCst);
    take_over(&CONSOLE);
    take_over(&TX);
    drain_all();
}
