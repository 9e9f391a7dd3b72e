//! A per-vCPU record of the last events Vireo queued for injection, for the post-mortem of a
//! VM that hangs or dies: what was injected, whether it was a fresh decision or the re-queue
//! of an event an exit interrupted (SVM EXITINTINFO, VMX IDT-vectoring information), and
//! what the guest's interruptibility was (RFLAGS.IF, STI/MOV SS shadow) when it was queued.
//!
//! A fresh external interrupt queued while the guest had IF = 0 or an interrupt shadow is a
//! Vireo bug (the guest could not have taken it): such injections are counted apart
//! ([`InjectionLog::masked`]) so a normal run shows 0. A re-queue is exempt: the delivery
//! already started, with the guest interruptible, before the exit.

use core::fmt;

use super::exit::Event;

/// Injections remembered per vCPU.
pub const RING: usize = 16;

/// Where a queued event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Vireo decided to deliver it now (an interrupt, NMI or exception).
    Fresh,
    /// Its delivery was interrupted by an exit, and it was queued again.
    Requeue,
}

/// One queued event and the guest state it was queued in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    pub event: Event,
    pub origin: Origin,
    /// RFLAGS.IF of the guest when the event was queued.
    pub if_on: bool,
    /// An STI / MOV SS interrupt shadow was in force.
    pub shadow: bool,
    pub rip: u64,
    /// The TSC when it was queued.
    pub tsc: u64,
}

impl Injection {
    /// A fresh external interrupt the guest could not have taken.
    pub fn masked(&self) -> bool {
        matches!(self.event, Event::Interrupt { .. }) && self.origin == Origin::Fresh && (!self.if_on || self.shadow)
    }
}

impl fmt::Display for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.event {
            Event::Interrupt { vector } => write!(f, "event=intr vector={vector:#x}")?,
            Event::Nmi => write!(f, "event=nmi")?,
            Event::Exception { vector, error_code } => {
                write!(f, "event=exception vector={vector}")?;
                if let Some(e) = error_code {
                    write!(f, " error={e:#x}")?;
                }
            }
        }
        let origin = match self.origin {
            Origin::Fresh => "fresh",
            Origin::Requeue => "requeue",
        };
        write!(
            f,
            " origin={origin} if={} shadow={} rip={:#x} tsc={}",
            self.if_on as u8, self.shadow as u8, self.rip, self.tsc
        )?;
        if self.masked() {
            f.write_str(" MASKED")?;
        }
        Ok(())
    }
}

/// The ring of the last [`RING`] injections and the counts over the vCPU's life.
#[derive(Clone, Debug)]
pub struct InjectionLog {
    ring: [Option<Injection>; RING],
    next: usize,
    /// Injections recorded.
    pub total: u64,
    /// Of those, [`Injection::masked`] ones.
    pub masked: u64,
}

impl Default for InjectionLog {
    fn default() -> Self {
        Self { ring: [None; RING], next: 0, total: 0, masked: 0 }
    }
}

impl InjectionLog {
    pub fn record(&mut self, i: Injection) {
        if i.masked() {
            self.masked += 1;
        }
        self.total += 1;
        self.ring[self.next] = Some(i);
        self.next = (self.next + 1) % RING;
    }

    /// The remembered injections, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Injection> + '_ {
        (0..RING).filter_map(move |k| self.ring[(self.next + k) % RING].as_ref())
    }
}

/// A 64-bit interrupt/exception stack frame found on the guest's stack (post-mortem): where
/// it lies and what it holds (SDM Vol. 3A §7.14.2: RIP, CS, RFLAGS, RSP, SS upwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackFrame {
    pub at: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl fmt::Display for StackFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at={:#x} rip={:#x} cs={:#x} rflags={:#x} if={} rsp={:#x} ss={:#x}",
            self.at,
            self.rip,
            self.cs,
            self.rflags,
            (self.rflags >> 9) & 1,
            self.rsp,
            self.ss
        )
    }
}

/// Whether five stack words (lowest address first) look like a 64-bit interrupt frame a
/// Linux guest took: kernel CS 0x10 with a kernel RIP, or user CS 0x33/0x23; RFLAGS with its
/// fixed bit 1 set and its reserved bits clear; SS a Linux selector or null.
pub fn is_interrupt_frame(w: &[u64; 5]) -> bool {
    let [rip, cs, rflags, rsp, ss] = *w;
    let cs_ok = match cs {
        0x10 => rip >= 0xFFFF_8000_0000_0000 && rsp >= 0xFFFF_8000_0000_0000,
        0x33 | 0x23 => rip < 0x0000_8000_0000_0000,
        _ => false,
    };
    let flags_ok = rflags & 2 != 0 && rflags & (0x8 | 0x20 | 0x8000 | !0x3F_FFFF) == 0;
    cs_ok && flags_ok && matches!(ss, 0 | 0x18 | 0x2B)
}

#[cfg(test)]
mod tests {
    use alloc::{format, vec::Vec};

    use super::*;

    fn intr(vector: u8, origin: Origin, if_on: bool, shadow: bool, rip: u64) -> Injection {
        Injection { event: Event::Interrupt { vector }, origin, if_on, shadow, rip, tsc: rip }
    }

    #[test]
    fn recognizes_linux_interrupt_frames() {
        let kernel = [0xFFFF_FFFF_8100_1234, 0x10, 0x46, 0xFFFF_C900_0000_3F00, 0x18];
        assert!(is_interrupt_frame(&kernel));
        assert!(is_interrupt_frame(&[0xFFFF_FFFF_8100_1234, 0x10, 0x246, 0xFFFF_C900_0000_3F00, 0]));
        assert!(is_interrupt_frame(&[0x40_1000, 0x33, 0x202, 0x7FFF_FFFF_E000, 0x2B]));
        // A user RIP with kernel CS, a wrong CS, RFLAGS without bit 1 or with high bits.
        assert!(!is_interrupt_frame(&[0x40_1000, 0x10, 0x246, 0xFFFF_C900_0000_3F00, 0x18]));
        assert!(!is_interrupt_frame(&[0xFFFF_FFFF_8100_1234, 0x08, 0x246, 0xFFFF_C900_0000_3F00, 0x18]));
        assert!(!is_interrupt_frame(&[0xFFFF_FFFF_8100_1234, 0x10, 0x244, 0xFFFF_C900_0000_3F00, 0x18]));
        assert!(!is_interrupt_frame(&[0xFFFF_FFFF_8100_1234, 0x10, 0x1_0000_0246, 0xFFFF_C900_0000_3F00, 0x18]));
        assert!(!is_interrupt_frame(&[0xFFFF_FFFF_8100_1234, 0x10, 0x246, 0xFFFF_C900_0000_3F00, 0x20]));
        let f = StackFrame { at: 0x10, rip: 0x20, cs: 0x10, rflags: 0x46, rsp: 0x30, ss: 0x18 };
        assert_eq!(format!("{f}"), "at=0x10 rip=0x20 cs=0x10 rflags=0x46 if=0 rsp=0x30 ss=0x18");
    }

    #[test]
    fn keeps_the_last_ring_entries_oldest_first() {
        let mut log = InjectionLog::default();
        assert_eq!(log.iter().count(), 0);
        for k in 0..3 {
            log.record(intr(0x20, Origin::Fresh, true, false, k));
        }
        assert_eq!(log.iter().map(|i| i.rip).collect::<Vec<_>>(), [0, 1, 2]);
        for k in 3..(RING as u64 + 5) {
            log.record(intr(0x20, Origin::Fresh, true, false, k));
        }
        let rips: Vec<u64> = log.iter().map(|i| i.rip).collect();
        assert_eq!(rips.len(), RING);
        assert_eq!(rips.first(), Some(&5));
        assert_eq!(rips.last(), Some(&(RING as u64 + 4)));
        assert!(rips.windows(2).all(|w| w[0] + 1 == w[1]));
        assert_eq!((log.total, log.masked), (RING as u64 + 5, 0));
    }

    #[test]
    fn only_fresh_interrupts_into_a_masked_guest_count_as_masked() {
        let mut log = InjectionLog::default();
        log.record(intr(0xec, Origin::Fresh, true, false, 1));
        // A re-queue of an interrupted delivery: the guest's IF is already cleared by then.
        log.record(intr(0xec, Origin::Requeue, false, false, 2));
        // Exceptions and NMIs do not depend on IF.
        log.record(Injection { event: Event::GP0, origin: Origin::Fresh, if_on: false, shadow: true, rip: 3, tsc: 3 });
        log.record(Injection { event: Event::Nmi, origin: Origin::Fresh, if_on: false, shadow: false, rip: 4, tsc: 4 });
        assert_eq!(log.masked, 0);
        log.record(intr(0x30, Origin::Fresh, false, false, 5));
        log.record(intr(0x31, Origin::Fresh, true, true, 6));
        assert_eq!((log.total, log.masked), (6, 2));
        let lines: Vec<_> = log.iter().map(|i| format!("{i}")).collect();
        assert_eq!(lines[0], "event=intr vector=0xec origin=fresh if=1 shadow=0 rip=0x1 tsc=1");
        assert_eq!(lines[1], "event=intr vector=0xec origin=requeue if=0 shadow=0 rip=0x2 tsc=2");
        assert_eq!(lines[2], "event=exception vector=13 error=0x0 origin=fresh if=0 shadow=1 rip=0x3 tsc=3");
        assert_eq!(lines[3], "event=nmi origin=fresh if=0 shadow=0 rip=0x4 tsc=4");
        assert!(lines[4].ends_with(" MASKED") && lines[5].ends_with(" MASKED"));
    }
}
