//! Interrupt messages between a VM's interrupt sources (local APIC ICRs, the I/O APIC) and
//! its vCPUs' local APICs, and their routing (SDM Vol. 3A §12.6 "Issuing Interprocessor
//! Interrupts", §12.12.9-10 for x2APIC).
//!
//! A [`Message`] is what travels on the (virtual) APIC bus: a delivery mode, a vector and a
//! [`Destination`]. Local APICs produce them from ICR writes
//! ([`super::lapic::LocalApic::take_ipi`]); the I/O APIC from its redirection entries
//! ([`super::ioapic::Delivery::message`]). The owner of the vCPUs routes each message with
//! [`route`] (or [`super::lapic::LocalApic::matches`] per APIC) and hands it to every
//! selected APIC's [`super::lapic::LocalApic::accept`].
//!
//! Destination matching (SDM §12.6.2, as KVM does it):
//! - Physical: the APIC ID in the receiver's current mode (8-bit xAPIC ID register, or the
//!   32-bit x2APIC ID); [`XAPIC_BROADCAST`] (0xFF) addresses every xAPIC-mode APIC and
//!   [`X2APIC_BROADCAST`] (0xFFFF_FFFF) every x2APIC-mode APIC. The receiver's mode decides
//!   (a VM whose APICs are in different modes gets what it asked for).
//! - Logical, xAPIC: the message destination address (MDA, the low 8 bits) against the LDR's
//!   bits 31:24 under the DFR model: flat (DFR bits 31:28 = 1111b): any common bit; cluster
//!   (0000b): the same cluster (bits 7:4) and a common bit in 3:0. MDA 0xFF is a broadcast.
//! - Logical, x2APIC (§12.12.10.2): the cluster (bits 31:16) equal and a common bit in 15:0;
//!   0xFFFF_FFFF is a broadcast.
//! - Shorthands (ICR bits 19:18): self, all including self, all excluding self; the caller
//!   says which APIC sent the message.
//! - A hardware-disabled APIC (IA32_APIC_BASE.EN = 0) receives nothing.
//!
//! Lowest priority (§12.6.2.4): [`route`] picks one of the matching, software-enabled APICs:
//! the one with the lowest processor priority (PPR), the first (lowest index) on a tie. Focus
//! processor checking and arbitration IDs are not modelled.

use super::lapic::LocalApic;

/// The physical broadcast ID in xAPIC mode.
pub const XAPIC_BROADCAST: u32 = 0xFF;
/// The physical and logical broadcast ID in x2APIC mode.
pub const X2APIC_BROADCAST: u32 = 0xFFFF_FFFF;
/// The number of APICs [`route`] can select (bits of its result).
pub const MAX_ROUTED: usize = 64;

/// How the receiving APIC handles a message (ICR bits 10:8, SDM Figure 12-12; I/O APIC
/// redirection entry bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// 000b: the vector into the IRR.
    Fixed,
    /// 001b: like Fixed, to one APIC of the destination set.
    LowestPriority,
    /// 010b: a system-management interrupt (not modelled: receivers count and drop it).
    Smi,
    /// 100b: a non-maskable interrupt (the vector is ignored).
    Nmi,
    /// 101b with level assert (or edge trigger): INIT.
    Init,
    /// 101b with level de-assert and level trigger: INIT level de-assert, a no-op on every
    /// processor since the Pentium 4 (SDM §12.6.1); receivers ignore it.
    InitDeassert,
    /// 110b (ICR only): STARTUP; the vector is the 4 KiB page the AP starts at.
    Startup,
    /// 111b (I/O APIC only): the interrupt comes from an external 8259 (the receiver runs
    /// an INTA cycle on the PIC).
    ExtInt,
}

impl DeliveryMode {
    /// Decodes an I/O APIC redirection entry's bits 10:8 (82093AA §3.2.4); `None` for the
    /// reserved encodings 011b and 110b.
    pub fn from_rte_bits(bits: u8) -> Option<Self> {
        match bits & 7 {
            0b000 => Some(Self::Fixed),
            0b001 => Some(Self::LowestPriority),
            0b010 => Some(Self::Smi),
            0b100 => Some(Self::Nmi),
            0b101 => Some(Self::Init),
            0b111 => Some(Self::ExtInt),
            _ => None,
        }
    }

    /// Decodes an ICR's bits 10:8 with its level (bit 14) and trigger mode (bit 15) flags
    /// (SDM §12.6.1); `None` for the reserved encodings 011b and 111b. INIT with level
    /// de-assert and level trigger is [`Self::InitDeassert`] (as KVM decodes it).
    pub fn from_icr_bits(bits: u8, level_assert: bool, trigger_level: bool) -> Option<Self> {
        match bits & 7 {
            0b000 => Some(Self::Fixed),
            0b001 => Some(Self::LowestPriority),
            0b010 => Some(Self::Smi),
            0b100 => Some(Self::Nmi),
            0b101 if trigger_level && !level_assert => Some(Self::InitDeassert),
            0b101 => Some(Self::Init),
            0b110 => Some(Self::Startup),
            _ => None,
        }
    }

    /// Whether the mode carries a vector into the IRR (Fixed, Lowest Priority).
    pub fn is_fixed(self) -> bool {
        matches!(self, Self::Fixed | Self::LowestPriority)
    }
}

/// Which APICs a message addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// An APIC ID (or a broadcast ID) in physical destination mode.
    Physical(u32),
    /// A logical destination (xAPIC: the 8-bit MDA in bits 7:0; x2APIC: cluster in 31:16,
    /// member bits in 15:0).
    Logical(u32),
    /// Shorthand 01b: the sender only.
    SelfOnly,
    /// Shorthand 10b: every APIC, the sender included.
    AllIncludingSelf,
    /// Shorthand 11b: every APIC but the sender.
    AllExcludingSelf,
}

/// An interrupt message on the APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub mode: DeliveryMode,
    /// The vector (Fixed, Lowest Priority), or the start page (Startup); ignored otherwise.
    pub vector: u8,
    /// ICR bit 14 for INIT (false with level trigger: [`DeliveryMode::InitDeassert`]); true
    /// for every other message (the bit only qualifies INIT, SDM §12.6.1).
    pub level_assert: bool,
    /// Level-triggered: a Fixed/Lowest Priority vector from the I/O APIC sets its TMR bit at
    /// the receiver, whose EOI is then broadcast back to the I/O APIC. Messages from an ICR
    /// carry the ICR's trigger bit for INIT only and are edge otherwise.
    pub trigger_level: bool,
    pub dest: Destination,
}

/// The APICs that receive `msg`, as a bit mask over `apics` (bit `i` = the `i`-th APIC; only
/// the first [`MAX_ROUTED`] are considered). `sender` is the index of the sending APIC
/// (`None` for the I/O APIC or another device: the shorthands then address nobody
/// respectively everybody). Lowest Priority selects at most one APIC (see the module
/// documentation); every other mode selects all matching APICs.
pub fn route<'a>(msg: &Message, sender: Option<usize>, apics: impl IntoIterator<Item = &'a LocalApic>) -> u64 {
    let mut mask = 0u64;
    let mut best: Option<(u8, usize)> = None;
    for (i, apic) in apics.into_iter().take(MAX_ROUTED).enumerate() {
        if !apic.matches(msg.dest, sender == Some(i)) {
            continue;
        }
        if msg.mode == DeliveryMode::LowestPriority {
            if apic.sw_enabled() && best.is_none_or(|(ppr, _)| apic.ppr() < ppr) {
                best = Some((apic.ppr(), i));
            }
        } else {
            mask |= 1 << i;
        }
    }
    match best {
        Some((_, i)) => 1 << i,
        None => mask,
    }
}

/// Routes `msg` ([`route`]) and hands it to every selected APIC's
/// [`LocalApic::accept`]; returns the selection (the vCPUs to wake or kick).
pub fn deliver(msg: &Message, sender: Option<usize>, apics: &mut [LocalApic]) -> u64 {
    let mask = route(msg, sender, apics.iter());
    for (i, apic) in apics.iter_mut().enumerate().take(MAX_ROUTED) {
        if mask & 1 << i != 0 {
            apic.accept(msg);
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::lapic::{reg, APIC_BASE_EN, APIC_BASE_EXTD, DEFAULT_APIC_BASE, DEFAULT_TIMER_HZ};
    use crate::devices::time::Nanos;

    const T0: Nanos = Nanos::ZERO;

    fn xapic(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id, id == 0, DEFAULT_TIMER_HZ);
        a.mmio_write(reg::SVR, 0x1FF, T0);
        a
    }

    fn x2apic(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id, id == 0, DEFAULT_TIMER_HZ);
        a.set_apic_base(DEFAULT_APIC_BASE | APIC_BASE_EN | APIC_BASE_EXTD).unwrap();
        a.msr_write(reg::msr(reg::SVR), 0x1FF, T0).unwrap();
        a
    }

    fn fixed(dest: Destination) -> Message {
        Message { mode: DeliveryMode::Fixed, vector: 0x40, level_assert: true, trigger_level: false, dest }
    }

    /// Linux's AP bring-up through the ICR of CPU 0: INIT, INIT de-assert, STARTUP, STARTUP,
    /// then a reschedule IPI to all but self.
    #[test]
    fn ap_startup_sequence() {
        let mut apics =
            [xapic(0), LocalApic::new(1, false, DEFAULT_TIMER_HZ), LocalApic::new(2, false, DEFAULT_TIMER_HZ)];
        apics[0].mmio_write(reg::ICR_HIGH, 2 << 24, T0);
        for low in [0xC500, 0x8500, 0x0699, 0x0699] {
            apics[0].mmio_write(reg::ICR_LOW, low, T0);
            while let Some(msg) = apics[0].take_ipi() {
                assert_eq!(deliver(&msg, Some(0), &mut apics), 0b100);
            }
        }
        assert!(apics[2].take_init());
        assert_eq!(apics[2].take_sipi(), Some(0x99), "the second STARTUP is ignored");
        assert_eq!(apics[2].take_sipi(), None);
        assert!(apics[1].waiting_for_sipi() && !apics[2].waiting_for_sipi());
        assert_eq!(apics[1].take_sipi(), None);
        // The AP enables its APIC; a fixed IPI to all but self reaches it only.
        apics[2].mmio_write(reg::SVR, 0x1FF, T0);
        apics[0].mmio_write(reg::ICR_LOW, 3 << 18 | 0xFD, T0);
        let msg = apics[0].take_ipi().unwrap();
        assert_eq!(deliver(&msg, Some(0), &mut apics), 0b110);
        assert_eq!(apics[2].acknowledge(), Some(0xFD));
        assert_eq!(apics[1].pending(), None, "software-disabled APIC refuses fixed vectors");
        assert_eq!(apics[0].pending(), None);
    }

    #[test]
    fn decoding() {
        assert_eq!(DeliveryMode::from_icr_bits(0b101, true, true), Some(DeliveryMode::Init));
        assert_eq!(DeliveryMode::from_icr_bits(0b101, false, false), Some(DeliveryMode::Init));
        assert_eq!(DeliveryMode::from_icr_bits(0b101, false, true), Some(DeliveryMode::InitDeassert));
        assert_eq!(DeliveryMode::from_icr_bits(0b110, false, false), Some(DeliveryMode::Startup));
        assert_eq!(DeliveryMode::from_icr_bits(0b011, true, false), None);
        assert_eq!(DeliveryMode::from_icr_bits(0b111, true, false), None);
        assert_eq!(DeliveryMode::from_rte_bits(0b111), Some(DeliveryMode::ExtInt));
        assert_eq!(DeliveryMode::from_rte_bits(0b110), None);
        assert!(DeliveryMode::LowestPriority.is_fixed() && !DeliveryMode::Nmi.is_fixed());
    }

    #[test]
    fn physical_and_shorthands() {
        let apics = [xapic(0), xapic(1), xapic(2), xapic(3)];
        let r = |dest, sender| route(&fixed(dest), sender, &apics);
        assert_eq!(r(Destination::Physical(2), Some(0)), 0b0100);
        assert_eq!(r(Destination::Physical(0), Some(0)), 0b0001, "to itself by ID");
        assert_eq!(r(Destination::Physical(9), Some(0)), 0);
        assert_eq!(r(Destination::Physical(0x102), Some(0)), 0, "no truncation to 8 bits");
        assert_eq!(r(Destination::Physical(XAPIC_BROADCAST), Some(1)), 0b1111);
        assert_eq!(r(Destination::SelfOnly, Some(1)), 0b0010);
        assert_eq!(r(Destination::AllIncludingSelf, Some(1)), 0b1111);
        assert_eq!(r(Destination::AllExcludingSelf, Some(1)), 0b1101);
        assert_eq!(r(Destination::SelfOnly, None), 0, "a device has no self");
        assert_eq!(r(Destination::AllExcludingSelf, None), 0b1111);
        // x2APIC: 32-bit IDs, 0xFF is an ordinary ID, 0xFFFF_FFFF the broadcast.
        let x2 = [x2apic(0), x2apic(0xFF), x2apic(0x1_0000)];
        let r = |dest| route(&fixed(dest), Some(0), &x2);
        assert_eq!(r(Destination::Physical(0xFF)), 0b010);
        assert_eq!(r(Destination::Physical(0x1_0000)), 0b100);
        assert_eq!(r(Destination::Physical(X2APIC_BROADCAST)), 0b111);
    }

    #[test]
    fn logical_flat_and_cluster() {
        // Flat: Linux gives CPU n the LDR bit 1 << n.
        let mut apics = [xapic(0), xapic(1), xapic(2), xapic(3)];
        for (i, a) in apics.iter_mut().enumerate() {
            a.mmio_write(reg::LDR, 1 << (24 + i), T0);
        }
        let r = |apics: &[LocalApic], mda| route(&fixed(Destination::Logical(mda)), Some(0), apics);
        assert_eq!(r(&apics, 0b0110), 0b0110);
        assert_eq!(r(&apics, 0b1_0000), 0);
        assert_eq!(r(&apics, 0xFF), 0b1111, "broadcast");
        // Cluster: cluster in bits 7:4, member bits 3:0.
        for (i, a) in apics.iter_mut().enumerate() {
            a.mmio_write(reg::DFR, 0x0FFF_FFFF, T0);
            let (cluster, bit) = (i as u32 / 2, 1u32 << (i % 2));
            a.mmio_write(reg::LDR, (cluster << 4 | bit) << 24, T0);
        }
        assert_eq!(r(&apics, 0x03), 0b0011);
        assert_eq!(r(&apics, 0x12), 0b1000);
        assert_eq!(r(&apics, 0x24), 0);
        assert_eq!(r(&apics, 0xFF), 0b1111, "broadcast");
        // A hardware-disabled APIC receives nothing, not even a broadcast.
        apics[3].set_apic_base(DEFAULT_APIC_BASE).unwrap();
        assert_eq!(r(&apics, 0xFF), 0b0111);
        assert!(!apics[3].matches(Destination::AllIncludingSelf, true));
        // x2APIC: cluster id >> 4 in bits 31:16, bit 1 << (id & 0xF).
        let x2 = [x2apic(0), x2apic(1), x2apic(0x11), x2apic(0x1F)];
        let r = |mda| route(&fixed(Destination::Logical(mda)), Some(0), &x2);
        assert_eq!(r(0x0000_0003), 0b0011);
        assert_eq!(r(0x0001_8002), 0b1100);
        assert_eq!(r(0x0001_0001), 0);
        assert_eq!(r(X2APIC_BROADCAST), 0b1111);
    }

    #[test]
    fn lowest_priority_picks_one() {
        let mut apics = [xapic(0), xapic(1), xapic(2)];
        let msg = Message { mode: DeliveryMode::LowestPriority, ..fixed(Destination::AllIncludingSelf) };
        assert_eq!(route(&msg, None, &apics), 0b001, "tie: the first");
        apics[0].mmio_write(reg::TPR, 0x20, T0);
        apics[1].mmio_write(reg::TPR, 0x10, T0);
        assert_eq!(route(&msg, None, &apics), 0b100);
        apics[2].mmio_write(reg::TPR, 0x30, T0);
        assert_eq!(route(&msg, None, &apics), 0b010, "lowest PPR");
        // Software-disabled APICs are not chosen; no candidate at all: nobody.
        apics[1].mmio_write(reg::SVR, 0xFF, T0);
        assert_eq!(route(&msg, None, &apics), 0b001);
        let msg = Message { dest: Destination::Physical(1), ..msg };
        assert_eq!(route(&msg, None, &apics), 0);
        // deliver() accepts it at the chosen APIC.
        let msg = Message { dest: Destination::AllIncludingSelf, ..msg };
        assert_eq!(deliver(&msg, None, &mut apics), 0b001);
        assert_eq!(apics[0].pending(), Some(0x40));
        // Slices of references work too.

        let refs: [&LocalApic; 2] = [&apics[0], &apics[2]];
        assert_eq!(route(&fixed(Destination::Physical(2)), None, refs.iter().copied()), 0b10);
    }
}
