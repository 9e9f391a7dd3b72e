//! Event injection (APM Vol. 2 §15.20) and the re-injection of events whose delivery an
//! exit interrupted (EXITINTINFO, §15.7.2). EVENTINJ and EXITINTINFO share one format:
//!
//! | bits  | field |
//! |-------|-------|
//! | 7:0   | vector |
//! | 10:8  | type: 0 external interrupt, 2 NMI, 3 exception, 4 software interrupt |
//! | 11    | EV: push the error code |
//! | 31    | V: valid |
//! | 63:32 | error code |

use crate::vmm::exit::Event;

pub const VECTOR_MASK: u64 = 0xFF;
pub const TYPE_SHIFT: u32 = 8;
pub const TYPE_MASK: u64 = 7 << TYPE_SHIFT;
pub const ERROR_VALID: u64 = 1 << 11;
pub const VALID: u64 = 1 << 31;
pub const ERROR_SHIFT: u32 = 32;

/// Event types (APM Vol. 2 §15.20, EVENTINJ.TYPE).
pub const TYPE_INTR: u64 = 0;
pub const TYPE_NMI: u64 = 2;
pub const TYPE_EXCEPTION: u64 = 3;
pub const TYPE_SOFT_INT: u64 = 4;

const VECTOR_NMI: u8 = 2;
const VECTOR_BP: u8 = 3;
const VECTOR_OF: u8 = 4;

fn make(vector: u8, ty: u64, error_code: Option<u32>) -> u64 {
    let mut v = vector as u64 | (ty << TYPE_SHIFT) | VALID;
    if let Some(e) = error_code {
        v |= ERROR_VALID | ((e as u64) << ERROR_SHIFT);
    }
    v
}

/// The EVENTINJ value that delivers `event` (§15.20).
pub fn encode(event: Event) -> u64 {
    match event {
        Event::Interrupt { vector } => make(vector, TYPE_INTR, None),
        Event::Nmi => make(VECTOR_NMI, TYPE_NMI, None),
        // Type 3 with vector 2 is an illegal injection (§15.20): an NMI is type 2.
        Event::Exception { vector: VECTOR_NMI, .. } => make(VECTOR_NMI, TYPE_NMI, None),
        Event::Exception { vector, error_code } => make(vector, TYPE_EXCEPTION, error_code),
    }
}

pub fn vector(v: u64) -> u8 {
    (v & VECTOR_MASK) as u8
}

pub fn event_type(v: u64) -> u64 {
    (v & TYPE_MASK) >> TYPE_SHIFT
}

pub fn is_valid(v: u64) -> bool {
    v & VALID != 0
}

/// Whether EVENTINJ holds an injection VMRUN refuses (§15.20; checked by §15.5.1): a
/// reserved type (1, 5-7), or an exception with vector 2 or a vector above 31.
pub fn is_illegal(v: u64) -> bool {
    if !is_valid(v) {
        return false;
    }
    match event_type(v) {
        TYPE_INTR | TYPE_NMI | TYPE_SOFT_INT => false,
        TYPE_EXCEPTION => vector(v) == VECTOR_NMI || vector(v) > 31,
        _ => true,
    }
}

/// What to put in EVENTINJ after an exit whose EXITINTINFO is `info` (§15.7.2), when
/// `injected` is the EVENTINJ value Vireo itself wrote for that entry (0 for none).
///
/// * Nothing valid: nothing to retry.
/// * A software interrupt (INTn, type 4), or #BP/#OF raised by INT3/INTO in the guest:
///   the guest RIP still points at the instruction, so it is simply executed again
///   (re-injecting would push the wrong return address). A #BP/#OF Vireo injected itself
///   is retried.
/// * Anything else is retried as reported. Emulators record some deliveries with the
///   exception type (QEMU TCG: an NMI as type 3 vector 2, an interrupt as type 3 with its
///   vector >= 32); those are turned back into a legal NMI or external interrupt.
pub fn requeue(info: u64, injected: u64) -> Option<u64> {
    if !is_valid(info) {
        return None;
    }
    // Keep only the architectural fields (vector, type, EV, V, error code).
    let info = info & (0xFFFF_FFFF_0000_0000 | VALID | ERROR_VALID | TYPE_MASK | VECTOR_MASK);
    let v = vector(info);
    match event_type(info) {
        TYPE_INTR | TYPE_NMI => Some(info & !(ERROR_VALID | 0xFFFF_FFFF_0000_0000)),
        TYPE_SOFT_INT => None,
        TYPE_EXCEPTION if v == VECTOR_NMI => Some(make(VECTOR_NMI, TYPE_NMI, None)),
        TYPE_EXCEPTION if v > 31 => Some(make(v, TYPE_INTR, None)),
        TYPE_EXCEPTION if v == VECTOR_BP || v == VECTOR_OF => {
            let ours = is_valid(injected) && injected as u32 & 0x8FF == info as u32 & 0x8FF;
            ours.then_some(info)
        }
        TYPE_EXCEPTION => Some(if info & ERROR_VALID != 0 { info } else { info & 0xFFFF_FFFF }),
        _ => None,
    }
}

/// Whether the entry about to happen with EVENTINJ = `eventinj` must exit again right after
/// the event is delivered, on an SVM implementation that `redelivers` (see
/// [`redelivers_injected_interrupts`]): only an injected external interrupt is at risk.
pub fn exit_after_delivery(eventinj: u64, redelivers: bool) -> bool {
    redelivers && is_valid(eventinj) && event_type(eventinj) == TYPE_INTR
}

/// QEMU TCG's SVM (seen in 7.2 and later) delivers an external interrupt injected through
/// EVENTINJ inside VMRUN but leaves its vector as the CPU's pending exception number; the
/// next time its execution loop stops for an exit request (an I/O event, the icount
/// deadline) before any #VMEXIT or guest exception overwrote it, it delivers that vector a
/// second time through the guest's IDT, regardless of the guest's RFLAGS.IF, as if it were
/// an exception. A Linux guest then re-enters its interrupt handler while it is inside it
/// (IF = 0), e.g. the timer handler spins on the hrtimer lock the first one holds.
///
/// The stale vector is harmless once a #VMEXIT happened: Vireo makes the entry exit right
/// after the delivery (a self-IPI pending at VMRUN: the INTR intercept fires at the first
/// guest instruction boundary, before the loop can stop). QEMU TCG is recognized by its
/// missing nRIP-save (every AMD CPU with nested paging has it, and so has Bochs).
pub fn redelivers_injected_interrupts(nrip: bool) -> bool {
    !nrip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode(Event::Interrupt { vector: 0x20 }), 0x8000_0020);
        assert_eq!(encode(Event::Nmi), 0x8000_0202);
        assert_eq!(encode(Event::UD), 0x8000_0306);
        assert_eq!(encode(Event::GP0), 0x0000_0000_8000_0B0D);
        assert_eq!(encode(Event::Exception { vector: 14, error_code: Some(0x1234_5678) }), 0x1234_5678_8000_0B0E);
        assert_eq!(encode(Event::Exception { vector: 2, error_code: None }), encode(Event::Nmi));
        for e in [Event::Interrupt { vector: 0xFF }, Event::Nmi, Event::UD, Event::GP0] {
            assert!(!is_illegal(encode(e)), "{e:?}");
        }
    }

    #[test]
    fn illegal_injections() {
        assert!(is_illegal(VALID | (1 << TYPE_SHIFT) | 0x20));
        assert!(is_illegal(VALID | (5 << TYPE_SHIFT)));
        assert!(is_illegal(VALID | (TYPE_EXCEPTION << TYPE_SHIFT) | 2));
        assert!(is_illegal(VALID | (TYPE_EXCEPTION << TYPE_SHIFT) | 32));
        assert!(!is_illegal((5 << TYPE_SHIFT) | 0x20), "not valid: not checked");
        assert!(!is_illegal(VALID | (TYPE_SOFT_INT << TYPE_SHIFT) | 0x80));
    }

    #[test]
    fn only_injected_external_interrupts_exit_after_delivery_where_redelivered() {
        let intr = encode(Event::Interrupt { vector: 0xEC });
        assert!(exit_after_delivery(intr, true));
        assert!(!exit_after_delivery(intr, false), "not on implementations without the flaw");
        assert!(!exit_after_delivery(intr & !VALID, true), "nothing queued");
        for other in [encode(Event::Nmi), encode(Event::GP0), encode(Event::UD), make(0x80, TYPE_SOFT_INT, None)] {
            assert!(!exit_after_delivery(other, true), "{other:#x}");
        }
        // A re-queued interrupt (EXITINTINFO) is an external interrupt again.
        assert!(exit_after_delivery(requeue(0x8000_0331, 0).unwrap(), true));
        assert!(redelivers_injected_interrupts(false) && !redelivers_injected_interrupts(true));
    }

    #[test]
    fn requeue_policy() {
        // Nothing valid.
        assert_eq!(requeue(0x0000_0020, 0), None);
        // An interrupted external interrupt and NMI are retried as they were.
        assert_eq!(requeue(0x8000_0030, 0x8000_0030), Some(0x8000_0030));
        assert_eq!(requeue(0x8000_0202, 0), Some(0x8000_0202));
        // A #PF with its error code; reserved bits 30:12 dropped.
        assert_eq!(requeue(0x0000_0002_8000_7B0E, 0), Some(0x0000_0002_8000_0B0E));
        // An exception without EV loses any stale error-code half.
        assert_eq!(requeue(0xFFFF_FFFF_8000_0306, 0), Some(0x8000_0306));
        // INTn and guest INT3/INTO: re-executed, not re-injected.
        assert_eq!(requeue(0x8000_0480, 0), None);
        assert_eq!(requeue(0x8000_0303, 0), None);
        assert_eq!(requeue(0x8000_0304, 0x8000_0030), None);
        // ... unless Vireo injected that #BP itself.
        assert_eq!(requeue(0x8000_0303, encode(Event::Exception { vector: 3, error_code: None })), Some(0x8000_0303));
        // Emulator quirks: exception-typed NMI and interrupt.
        assert_eq!(requeue(0x8000_0302, 0), Some(encode(Event::Nmi)));
        assert_eq!(requeue(0x8000_0331, 0), Some(encode(Event::Interrupt { vector: 0x31 })));
        // Reserved types are dropped.
        assert_eq!(requeue(0x8000_0130, 0), None);
        // Everything re-queued is a legal injection.
        for info in [0x8000_0030u64, 0x8000_0202, 0x8000_0302, 0x8000_0331, 0x0000_0002_8000_7B0E] {
            assert!(!is_illegal(requeue(info, 0).unwrap()), "{info:#x}");
        }
    }
}
