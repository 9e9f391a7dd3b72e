//! One I/O APIC (Intel 82093AA I/O Advanced Programmable Interrupt Controller datasheet, with
//! the version 0x20 EOI register of the ICH south bridges' integrated I/O APIC), as Linux
//! drives it: 24 input pins (global system interrupts 0-23), each routed by a 64-bit
//! redirection entry to a local APIC interrupt.
//!
//! MMIO (one 4 KiB page at `base`, default 0xFEC0_0000): IOREGSEL at offset 0x00 (bits 7:0
//! select a register), IOWIN at 0x10 (the selected register), EOI at 0x40 (write-only: a vector
//! in bits 7:0; present because this model reports **version 0x20** — Linux uses it to clear a
//! stuck remote IRR and for directed EOI). Only aligned 32-bit accesses at those offsets are
//! defined (datasheet §3.0: "accessed as 32-bit quantities"); any other offset or size reads
//! all ones and ignores writes. Nothing the guest writes can make the model panic.
//!
//! Indirect registers (§3.2): 0x00 ID (bits 27:24, read/write), 0x01 VERSION (read-only:
//! version 0x20 in bits 7:0, maximum redirection entry 23 in bits 23:16), 0x02 ARB (read-only:
//! the arbitration ID in bits 27:24, loaded from the ID whenever the ID is written), 0x10-0x3F
//! the redirection table (entry `n` is registers `0x10 + 2n` (bits 31:0) and `0x11 + 2n`
//! (bits 63:32)). Unimplemented indices read 0 and ignore writes.
//!
//! Redirection entry (§3.2.4): vector 7:0, delivery mode 10:8, destination mode 11 (1 =
//! logical), delivery status 12 (read-only), polarity 13 (1 = active low), remote IRR 14
//! (read-only), trigger mode 15 (1 = level), mask 16, destination 63:56. Bits 55:17 are
//! reserved and read as 0. The destination is reported as the full 8 bits (xAPIC physical IDs
//! and logical masks). Reset: every entry masked, everything else 0.
//!
//! Triggering:
//! - Input levels come from [`IoApic::set_irq`]; an active-low pin (polarity 1) is *asserted*
//!   while its input is low.
//! - Edge-triggered pins latch a request on a rising edge of the asserted level. An edge that
//!   arrives while the pin is masked is lost (as on the 82093AA, which has no IRR for masked
//!   pins), and masking a pin drops a latched edge that has not been delivered yet. The
//!   SMI, NMI, INIT and ExtINT delivery modes are always edge-triggered, whatever the trigger
//!   mode bit says (§3.2.4: the trigger mode is ignored for them / they require edge).
//! - Level-triggered pins (Fixed or Lowest Priority) deliver while asserted, unmasked and with
//!   remote IRR clear; delivery sets remote IRR, and an EOI for the entry's vector (broadcast
//!   from a local APIC, [`IoApic::eoi`], or written to the EOI register) clears it, so a line
//!   that is still asserted is delivered again. Unmasking an asserted level pin delivers it.
//!   Changing an entry to edge-triggered clears its remote IRR (the chipset behaviour Linux's
//!   `__eoi_ioapic_pin` relies on for I/O APICs without an EOI register).
//! - Polarity changes do not by themselves produce an edge.
//! - Entries with a reserved delivery mode (0b011, 0b110) deliver nothing.
//! - Delivery status reads 1 while an interrupt is ready for [`IoApic::take_deliveries`].

/// The conventional I/O APIC base address.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Input pins (redirection entries).
pub const IOAPIC_PINS: u8 = 24;
/// The version this model reports (ICH-style I/O APIC with an EOI register).
pub const IOAPIC_VERSION: u8 = 0x20;
/// Size of the MMIO window.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;

/// MMIO offsets.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const IOEOI: u64 = 0x40;

/// Indirect register indices.
pub const REG_ID: u8 = 0x00;
pub const REG_VERSION: u8 = 0x01;
pub const REG_ARB: u8 = 0x02;
pub const REG_REDTBL: u8 = 0x10;

/// Redirection entry bits.
pub const RTE_DELIVERY_STATUS: u64 = 1 << 12;
pub const RTE_POLARITY_LOW: u64 = 1 << 13;
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
pub const RTE_LEVEL: u64 = 1 << 15;
pub const RTE_MASKED: u64 = 1 << 16;
pub const RTE_LOGICAL: u64 = 1 << 11;
/// Bits the guest can write: vector, delivery mode, destination mode, polarity, trigger
/// mode, mask and destination.
const RTE_WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

pub use super::irq::DeliveryMode;
use super::irq::{Destination, Message};

/// Whether a redirection entry's delivery mode can be level-triggered (and so uses remote
/// IRR): Fixed and Lowest Priority only.
fn allows_level(mode: DeliveryMode) -> bool {
    mode.is_fixed()
}

/// An interrupt message for the local APIC(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub vector: u8,
    /// Physical APIC ID, or the logical destination mask if `logical`.
    pub dest: u8,
    pub logical: bool,
    pub mode: DeliveryMode,
    /// Level-triggered: the local APIC sets the vector's TMR bit and its EOI must reach
    /// [`IoApic::eoi`].
    pub level: bool,
}

impl Delivery {
    /// The message on the APIC bus, for routing to any vCPU's local APIC
    /// ([`super::irq::route`]): the entry's destination field as a physical APIC ID or a
    /// logical MDA per its destination mode (bit 11), 8 bits wide (xAPIC format; physical
    /// 0xFF is the xAPIC broadcast), with the entry's trigger mode.
    pub fn message(&self) -> Message {
        let dest =
            if self.logical { Destination::Logical(self.dest.into()) } else { Destination::Physical(self.dest.into()) };
        Message { mode: self.mode, vector: self.vector, level_assert: true, trigger_level: self.level, dest }
    }
}

pub struct IoApic {
    base: u64,
    /// I/O APIC ID (4 bits).
    id: u8,
    /// Arbitration ID (4 bits), loaded from `id` when the ID register is written.
    arb: u8,
    regsel: u8,
    /// Redirection entries as stored; delivery status (bit 12) is computed on read.
    entries: [u64; IOAPIC_PINS as usize],
    /// Input levels as last reported (not polarity-adjusted).
    lines: u32,
    /// Edges latched on edge-triggered pins, not yet delivered.
    latched: u32,
}

impl IoApic {
    /// An I/O APIC at `base` (its 4 KiB page) with ID `id` (bits 3:0 used), in its reset state.
    pub fn new(base: u64, id: u8) -> Self {
        Self {
            base,
            id: id & 0xF,
            arb: id & 0xF,
            regsel: 0,
            entries: [RTE_MASKED; IOAPIC_PINS as usize],
            lines: 0,
            latched: 0,
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether `gpa` lies in the I/O APIC's 4 KiB MMIO page.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa.checked_sub(self.base).is_some_and(|off| off < IOAPIC_MMIO_SIZE)
    }

    /// Redirection entry of `pin` as the guest would read it; `None` for a pin out of range.
    pub fn redirection_entry(&self, pin: u8) -> Option<u64> {
        let e = *self.entries.get(pin as usize)?;
        Some(if self.ready(pin) { e | RTE_DELIVERY_STATUS } else { e })
    }

    /// A read of `size` bytes at `offset` in the MMIO page.
    pub fn mmio_read(&mut self, offset: u64, size: u8) -> u32 {
        if size != 4 {
            return u32::MAX;
        }
        match offset {
            IOREGSEL => self.regsel as u32,
            IOWIN => self.read_reg(self.regsel),
            IOEOI => 0,
            _ => u32::MAX,
        }
    }

    /// A write of `size` bytes at `offset` in the MMIO page.
    pub fn mmio_write(&mut self, offset: u64, size: u8, value: u32) {
        if size != 4 {
            return;
        }
        match offset {
            IOREGSEL => self.regsel = value as u8,
            IOWIN => self.write_reg(self.regsel, value),
            IOEOI => self.eoi(value as u8),
            _ => {}
        }
    }

    /// Sets the input level of `pin` (out-of-range pins are ignored).
    pub fn set_irq(&mut self, pin: u8, level: bool) {
        if pin >= IOAPIC_PINS {
            return;
        }
        let was = self.asserted(pin);
        let bit = 1u32 << pin;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let e = self.entries[pin as usize];
        if !was && self.asserted(pin) && self.is_edge(pin) && e & RTE_MASKED == 0 {
            self.latched |= bit;
        }
    }

    /// Hands every interrupt that is ready now to `out`, lowest pin first.
    pub fn take_deliveries(&mut self, out: &mut impl FnMut(Delivery)) {
        for pin in 0..IOAPIC_PINS {
            if !self.ready(pin) {
                continue;
            }
            let i = pin as usize;
            let e = self.entries[i];
            let Some(mode) = DeliveryMode::from_rte_bits((e >> 8) as u8) else {
                // Reserved mode: a latched edge is dropped; a level stays pending (and
                // harmless) until the entry is fixed.
                self.latched &= !(1 << pin);
                continue;
            };
            let level = !self.is_edge(pin);
            if level {
                self.entries[i] |= RTE_REMOTE_IRR;
            } else {
                self.latched &= !(1 << pin);
            }
            out(Delivery { vector: e as u8, dest: (e >> 56) as u8, logical: e & RTE_LOGICAL != 0, mode, level });
        }
    }

    /// An EOI for `vector` (a local APIC's broadcast, or a write to the EOI register): clears
    /// the remote IRR of every level-triggered entry with that vector. A line still asserted
    /// is delivered again by the next [`IoApic::take_deliveries`].
    pub fn eoi(&mut self, vector: u8) {
        for e in self.entries.iter_mut() {
            if *e as u8 == vector && *e & RTE_REMOTE_IRR != 0 {
                *e &= !RTE_REMOTE_IRR;
            }
        }
    }

    /// Whether `pin`'s input is at its active level.
    fn asserted(&self, pin: u8) -> bool {
        let high = self.lines & (1 << pin) != 0;
        high != (self.entries[pin as usize] & RTE_POLARITY_LOW != 0)
    }

    /// Whether `pin` is edge-triggered (trigger mode bit, or a mode that is always edge).
    fn is_edge(&self, pin: u8) -> bool {
        let e = self.entries[pin as usize];
        e & RTE_LEVEL == 0 || !DeliveryMode::from_rte_bits((e >> 8) as u8).is_some_and(allows_level)
    }

    /// Whether `pin` has an interrupt to deliver now (reported as delivery status).
    fn ready(&self, pin: u8) -> bool {
        let e = self.entries[pin as usize];
        if e & RTE_MASKED != 0 {
            return false;
        }
        if self.is_edge(pin) {
            self.latched & (1 << pin) != 0
        } else {
            e & RTE_REMOTE_IRR == 0 && self.asserted(pin)
        }
    }

    fn read_reg(&self, index: u8) -> u32 {
        match index {
            REG_ID => (self.id as u32) << 24,
            REG_VERSION => ((IOAPIC_PINS as u32 - 1) << 16) | IOAPIC_VERSION as u32,
            REG_ARB => (self.arb as u32) << 24,
            REG_REDTBL..=0x3F => {
                let pin = (index - REG_REDTBL) / 2;
                let e = self.redirection_entry(pin).unwrap_or(0);
                if index & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, index: u8, value: u32) {
        match index {
            REG_ID => {
                self.id = ((value >> 24) & 0xF) as u8;
                self.arb = self.id;
            }
            REG_REDTBL..=0x3F => {
                let pin = (index - REG_REDTBL) / 2;
                let i = pin as usize;
                let old = self.entries[i];
                let (shift, half) = if index & 1 == 0 { (0, 0xFFFF_FFFFu64) } else { (32, 0xFFFF_FFFF_0000_0000) };
                let writable = RTE_WRITABLE & half;
                let mut new = (old & !writable) | (((value as u64) << shift) & writable);
                if new & RTE_LEVEL == 0 {
                    new &= !RTE_REMOTE_IRR;
                }
                self.entries[i] = new;
                if self.is_edge(pin) {
                    if new & RTE_MASKED != 0 {
                        self.latched &= !(1 << pin);
                    }
                } else {
                    self.latched &= !(1 << pin);
                }
            }
            _ => {} // VERSION, ARB and unimplemented indices are read-only.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn read_reg(io: &mut IoApic, index: u8) -> u32 {
        io.mmio_write(IOREGSEL, 4, index as u32);
        io.mmio_read(IOWIN, 4)
    }

    fn write_reg(io: &mut IoApic, index: u8, value: u32) {
        io.mmio_write(IOREGSEL, 4, index as u32);
        io.mmio_write(IOWIN, 4, value);
    }

    /// Linux's `__ioapic_write_entry`: high half first, then low.
    fn write_entry(io: &mut IoApic, pin: u8, e: u64) {
        write_reg(io, REG_REDTBL + 2 * pin + 1, (e >> 32) as u32);
        write_reg(io, REG_REDTBL + 2 * pin, e as u32);
    }

    fn read_entry(io: &mut IoApic, pin: u8) -> u64 {
        let lo = read_reg(io, REG_REDTBL + 2 * pin) as u64;
        let hi = read_reg(io, REG_REDTBL + 2 * pin + 1) as u64;
        (hi << 32) | lo
    }

    fn take(io: &mut IoApic) -> Vec<Delivery> {
        let mut v = Vec::new();
        io.take_deliveries(&mut |d| v.push(d));
        v
    }

    fn fixed(vector: u8, dest: u8, level: bool) -> Delivery {
        Delivery { vector, dest, logical: false, mode: DeliveryMode::Fixed, level }
    }

    #[test]
    fn reset_state_and_mmio_window() {
        let mut io = IoApic::new(IOAPIC_BASE, 2);
        assert_eq!(io.base(), IOAPIC_BASE);
        assert!(io.contains(IOAPIC_BASE));
        assert!(io.contains(IOAPIC_BASE + 0xFFF));
        assert!(!io.contains(IOAPIC_BASE + 0x1000));
        assert!(!io.contains(IOAPIC_BASE - 1));
        assert!(!IoApic::new(u64::MAX - 0x10, 0).contains(0));
        for pin in 0..IOAPIC_PINS {
            assert_eq!(read_entry(&mut io, pin), RTE_MASKED);
            assert_eq!(io.redirection_entry(pin), Some(RTE_MASKED));
        }
        assert_eq!(io.redirection_entry(IOAPIC_PINS), None);
        for pin in 0..IOAPIC_PINS {
            io.set_irq(pin, true);
        }
        assert!(take(&mut io).is_empty(), "all masked at reset");
    }

    #[test]
    fn id_version_arb_registers() {
        let mut io = IoApic::new(IOAPIC_BASE, 3);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0300_0000);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        assert_eq!(read_reg(&mut io, REG_ARB), 0x0300_0000);
        assert_eq!(io.mmio_read(IOREGSEL, 4), REG_ARB as u32);
        write_reg(&mut io, REG_ID, 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0F00_0000, "only bits 27:24");
        assert_eq!(read_reg(&mut io, REG_ARB), 0x0F00_0000, "ARB loaded from ID");
        assert_eq!(io.id(), 0xF);
        write_reg(&mut io, REG_VERSION, 0);
        write_reg(&mut io, REG_ARB, 0);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020, "read-only");
        assert_eq!(read_reg(&mut io, REG_ARB), 0x0F00_0000, "read-only");
        assert_eq!(read_reg(&mut io, 0x03), 0);
        assert_eq!(read_reg(&mut io, 0x40), 0, "beyond the table");
        assert_eq!(read_reg(&mut io, 0xFF), 0);
    }

    #[test]
    fn redirection_entry_round_trip_preserves_read_only_bits() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        write_entry(&mut io, 5, u64::MAX);
        // Reserved bits 55:17 and delivery status/remote IRR read 0.
        assert_eq!(read_entry(&mut io, 5), 0xFF00_0000_0001_AFFF);
        let e = 0x5A00_0000_0000_0000 | RTE_LEVEL | RTE_POLARITY_LOW | RTE_LOGICAL | (1 << 8) | 0x41;
        io.set_irq(5, true); // active low: deasserted
        write_entry(&mut io, 5, e);
        assert_eq!(read_entry(&mut io, 5), e);
        // Remote IRR set by a delivery survives writes that try to clear it.
        io.set_irq(5, false); // active low: asserted
        assert_eq!(read_entry(&mut io, 5), e | RTE_DELIVERY_STATUS, "ready to deliver");
        let d = take(&mut io);
        assert_eq!(
            d,
            [Delivery { vector: 0x41, dest: 0x5A, logical: true, mode: DeliveryMode::LowestPriority, level: true }]
        );
        assert_eq!(read_entry(&mut io, 5), e | RTE_REMOTE_IRR);
        write_reg(&mut io, REG_REDTBL + 10, e as u32 & !(RTE_REMOTE_IRR as u32));
        assert_eq!(read_entry(&mut io, 5), e | RTE_REMOTE_IRR, "remote IRR is read-only");
        write_reg(&mut io, REG_REDTBL + 11, 0x1200_0000);
        assert_eq!(read_entry(&mut io, 5) >> 32, 0x1200_0000, "high half independent");
        assert_eq!(read_entry(&mut io, 5) as u32, (e | RTE_REMOTE_IRR) as u32);
        // Switching to edge clears remote IRR (Linux's EOI fallback for version < 0x20).
        write_reg(&mut io, REG_REDTBL + 10, (e & !RTE_LEVEL) as u32 | RTE_MASKED as u32);
        assert_eq!(read_entry(&mut io, 5) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn edge_delivers_once_per_rising_edge() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        write_entry(&mut io, 4, (1u64 << 56) | 0x34);
        io.set_irq(4, true);
        assert_eq!(io.redirection_entry(4).unwrap() & RTE_DELIVERY_STATUS, RTE_DELIVERY_STATUS);
        assert_eq!(take(&mut io), [fixed(0x34, 1, false)]);
        assert!(take(&mut io).is_empty(), "once per edge");
        io.set_irq(4, true);
        assert!(take(&mut io).is_empty(), "no edge while held high");
        io.set_irq(4, false);
        assert!(take(&mut io).is_empty());
        // A pulse before the deliveries are taken is not lost; two pulses coalesce.
        io.set_irq(4, true);
        io.set_irq(4, false);
        io.set_irq(4, true);
        io.set_irq(4, false);
        assert_eq!(take(&mut io), [fixed(0x34, 1, false)]);
        // Edge pins ignore EOIs.
        io.eoi(0x34);
        assert!(take(&mut io).is_empty());
        // Out-of-range pins are ignored.
        io.set_irq(24, true);
        io.set_irq(255, true);
        assert!(take(&mut io).is_empty());
    }

    #[test]
    fn level_remote_irr_and_eoi_redelivery() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        write_entry(&mut io, 10, RTE_LEVEL | 0x3A);
        io.set_irq(10, true);
        assert_eq!(take(&mut io), [fixed(0x3A, 0, true)]);
        assert_ne!(read_entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        assert!(take(&mut io).is_empty(), "remote IRR blocks");
        io.eoi(0x3B);
        assert!(take(&mut io).is_empty(), "other vector");
        io.eoi(0x3A);
        assert_eq!(read_entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        assert_eq!(take(&mut io), [fixed(0x3A, 0, true)], "still high: delivered again");
        // Lowered before the EOI: nothing more; remote IRR stays until the EOI.
        io.set_irq(10, false);
        assert_ne!(read_entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        io.mmio_write(IOEOI, 4, 0x3A); // the version 0x20 EOI register
        assert_eq!(read_entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        assert!(take(&mut io).is_empty());
        // One EOI broadcast clears every entry sharing the vector.
        write_entry(&mut io, 11, RTE_LEVEL | 0x3A);
        io.set_irq(10, true);
        io.set_irq(11, true);
        assert_eq!(take(&mut io).len(), 2);
        io.eoi(0x3A);
        assert_eq!(take(&mut io).len(), 2);
    }

    #[test]
    fn masking() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        // Edge arriving while masked is lost.
        write_entry(&mut io, 1, RTE_MASKED | 0x31);
        io.set_irq(1, true);
        write_reg(&mut io, REG_REDTBL + 2, 0x31);
        assert!(take(&mut io).is_empty(), "edge while masked is lost");
        io.set_irq(1, false);
        io.set_irq(1, true);
        assert_eq!(take(&mut io), [fixed(0x31, 0, false)]);
        // A latched edge is dropped by masking before delivery.
        io.set_irq(1, false);
        io.set_irq(1, true);
        write_reg(&mut io, REG_REDTBL + 2, RTE_MASKED as u32 | 0x31);
        write_reg(&mut io, REG_REDTBL + 2, 0x31);
        assert!(take(&mut io).is_empty());
        // Level: delivered when unmasked while asserted.
        write_entry(&mut io, 9, RTE_MASKED | RTE_LEVEL | 0x39);
        io.set_irq(9, true);
        assert!(take(&mut io).is_empty());
        assert_eq!(read_entry(&mut io, 9) & RTE_DELIVERY_STATUS, 0);
        write_reg(&mut io, REG_REDTBL + 18, RTE_LEVEL as u32 | 0x39);
        assert_eq!(take(&mut io), [fixed(0x39, 0, true)]);
        // Masked with remote IRR set: the EOI clears it, unmasking re-delivers.
        write_reg(&mut io, REG_REDTBL + 18, (RTE_MASKED | RTE_LEVEL) as u32 | 0x39);
        io.eoi(0x39);
        assert!(take(&mut io).is_empty());
        write_reg(&mut io, REG_REDTBL + 18, RTE_LEVEL as u32 | 0x39);
        assert_eq!(take(&mut io), [fixed(0x39, 0, true)]);
    }

    #[test]
    fn active_low_polarity() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        // Level, active low (PCI style): asserted while the input is low.
        write_entry(&mut io, 16, RTE_POLARITY_LOW | RTE_LEVEL | 0x50);
        assert_eq!(take(&mut io), [fixed(0x50, 0, true)], "input idle at 0 = asserted");
        io.set_irq(16, true);
        io.eoi(0x50);
        assert!(take(&mut io).is_empty(), "high = deasserted");
        io.set_irq(16, false);
        assert_eq!(take(&mut io), [fixed(0x50, 0, true)]);
        // Edge, active low: latches on the falling edge of the input.
        write_entry(&mut io, 3, RTE_POLARITY_LOW | 0x33);
        io.set_irq(3, true);
        assert!(take(&mut io).is_empty());
        io.set_irq(3, false);
        assert_eq!(take(&mut io), [fixed(0x33, 0, false)]);
        // A polarity change is not an edge.
        write_entry(&mut io, 3, 0x33);
        write_entry(&mut io, 3, RTE_POLARITY_LOW | 0x33);
        assert!(take(&mut io).is_empty());
    }

    #[test]
    fn special_delivery_modes() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        // NMI programmed level-triggered is still edge: no remote IRR, once per edge.
        write_entry(&mut io, 6, RTE_LEVEL | (0b100 << 8));
        io.set_irq(6, true);
        let nmi = Delivery { vector: 0, dest: 0, logical: false, mode: DeliveryMode::Nmi, level: false };
        assert_eq!(take(&mut io), [nmi]);
        assert!(take(&mut io).is_empty());
        assert_eq!(read_entry(&mut io, 6) & RTE_REMOTE_IRR, 0);
        // ExtINT (virtual wire through the 8259) on pin 0.
        write_entry(&mut io, 0, 0b111 << 8);
        io.set_irq(0, true);
        assert_eq!(take(&mut io)[0].mode, DeliveryMode::ExtInt);
        // Reserved modes deliver nothing.
        write_entry(&mut io, 7, 0b011 << 8);
        write_entry(&mut io, 8, RTE_LEVEL | (0b110 << 8));
        io.set_irq(7, true);
        io.set_irq(8, true);
        assert!(take(&mut io).is_empty());
        for (bits, mode) in [(1, DeliveryMode::LowestPriority), (2, DeliveryMode::Smi), (5, DeliveryMode::Init)] {
            assert_eq!(DeliveryMode::from_rte_bits(bits), Some(mode));
        }
    }

    #[test]
    fn deliveries_route_to_any_local_apic() {
        use crate::devices::irq::{route, Destination, Message};
        use crate::devices::lapic::{reg, LocalApic, DEFAULT_TIMER_HZ};
        use crate::devices::time::Nanos;
        let mut apics: Vec<LocalApic> = (0..4).map(|i| LocalApic::new(i, i == 0, DEFAULT_TIMER_HZ)).collect();
        for (i, a) in apics.iter_mut().enumerate() {
            a.mmio_write(reg::SVR, 0x1FF, Nanos::ZERO);
            a.mmio_write(reg::LDR, 1 << (24 + i), Nanos::ZERO); // flat: CPU n has bit n
        }
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        // Pin 3: physical APIC 2, edge. Pin 9: logical MDA 0b1010 (CPUs 1 and 3), level.
        write_entry(&mut io, 3, (2u64 << 56) | 0x33);
        write_entry(&mut io, 9, (0b1010u64 << 56) | RTE_LOGICAL | RTE_LEVEL | 0x39);
        io.set_irq(3, true);
        io.set_irq(9, true);
        let d = take(&mut io);
        let msgs: Vec<Message> = d.iter().map(Delivery::message).collect();
        assert_eq!(msgs[0].dest, Destination::Physical(2));
        assert_eq!(msgs[1].dest, Destination::Logical(0b1010));
        assert!(!msgs[0].trigger_level && msgs[1].trigger_level);
        assert_eq!(route(&msgs[0], None, &apics), 0b0100);
        assert_eq!(route(&msgs[1], None, &apics), 0b1010);
        for m in &msgs {
            let mask = route(m, None, &apics);
            for (i, a) in apics.iter_mut().enumerate() {
                if mask & 1 << i != 0 {
                    a.accept(m);
                }
            }
        }
        assert_eq!(apics[2].acknowledge(), Some(0x33));
        assert_eq!(apics[0].pending(), None);
        assert_eq!(apics[1].acknowledge(), Some(0x39));
        // The level-triggered EOI comes back from the APIC that took it.
        apics[1].eoi();
        assert_eq!(apics[1].eoi_broadcast_vector(), Some(0x39));
        io.eoi(0x39);
        assert_eq!(take(&mut io).len(), 1, "still asserted: delivered again");
        // Physical 0xFF is the xAPIC broadcast.
        write_entry(&mut io, 4, (0xFFu64 << 56) | 0x34);
        io.set_irq(4, true);
        let m = take(&mut io)[0].message();
        assert_eq!(route(&m, None, &apics), 0b1111);
    }

    #[test]
    fn linux_probe_sequence() {
        let mut io = IoApic::new(IOAPIC_BASE, 0);
        // mp_register_ioapic: bad_ioapic_register reads ID, VERSION, ARB; the version gives
        // the number of entries.
        let regs = [read_reg(&mut io, REG_ID), read_reg(&mut io, REG_VERSION), read_reg(&mut io, REG_ARB)];
        assert!(regs.iter().any(|&r| r != u32::MAX));
        let entries = ((regs[1] >> 16) & 0xFF) + 1;
        assert_eq!(entries, 24);
        assert!(regs[1] as u8 >= 0x20, "Linux uses the EOI register");
        // clear_IO_APIC: read each entry, mask it (ioapic_mask_entry: low then high).
        for pin in 0..entries as u8 {
            let e = read_entry(&mut io, pin);
            assert_eq!(e & RTE_REMOTE_IRR, 0);
            write_reg(&mut io, REG_REDTBL + 2 * pin, RTE_MASKED as u32);
            write_reg(&mut io, REG_REDTBL + 2 * pin + 1, 0);
        }
        // MADT overrides: ISA IRQ0 -> GSI 2 (edge, active high); SCI IRQ9 -> GSI 9 (level,
        // active high). Programmed masked, then unmasked by rewriting the low half.
        let timer = 0x30u64;
        let sci = 0x21u64;
        write_entry(&mut io, 2, RTE_MASKED | timer);
        write_entry(&mut io, 9, RTE_MASKED | RTE_LEVEL | sci);
        io.set_irq(2, true);
        io.set_irq(2, false);
        assert!(take(&mut io).is_empty(), "masked");
        write_reg(&mut io, REG_REDTBL + 4, timer as u32);
        write_reg(&mut io, REG_REDTBL + 18, (RTE_LEVEL | sci) as u32);
        assert_eq!(read_entry(&mut io, 2), timer);
        assert_eq!(read_entry(&mut io, 9), RTE_LEVEL | sci);
        // PIT ticks (edge pulses on GSI 2), SCI asserted by PM1 status.
        io.set_irq(2, true);
        io.set_irq(2, false);
        io.set_irq(9, true);
        assert_eq!(take(&mut io), [fixed(0x30, 0, false), fixed(0x21, 0, true)]);
        io.set_irq(2, true);
        io.set_irq(2, false);
        assert_eq!(take(&mut io), [fixed(0x30, 0, false)], "SCI waits for its EOI");
        io.eoi(0x21);
        assert_eq!(take(&mut io), [fixed(0x21, 0, true)], "SCI still asserted");
        io.set_irq(9, false); // the handler cleared the PM1 status bit
        io.eoi(0x21);
        assert!(take(&mut io).is_empty());
        // Other pins stayed masked.
        for pin in (0..24).filter(|p| *p != 2 && *p != 9) {
            assert_eq!(read_entry(&mut io, pin), RTE_MASKED);
        }
    }

    #[test]
    fn any_offset_size_value_is_harmless() {
        let mut io = IoApic::new(IOAPIC_BASE, 0xFF);
        assert_eq!(io.id(), 0xF);
        assert_eq!(io.mmio_read(IOWIN, 1), 0xFFFF_FFFF);
        assert_eq!(io.mmio_read(0x04, 4), 0xFFFF_FFFF);
        assert_eq!(io.mmio_read(0x2000, 4), 0xFFFF_FFFF);
        assert_eq!(io.mmio_read(IOEOI, 4), 0);
        io.mmio_write(IOREGSEL, 2, REG_ID as u32);
        io.mmio_write(IOREGSEL, 4, 0x1234_5601);
        assert_eq!(io.mmio_read(IOREGSEL, 4), 0x01, "IOREGSEL is 8 bits");
        for offset in [0u64, 1, 4, 0x10, 0x11, 0x14, 0x20, 0x40, 0x41, 0xFFF, 0x1000, u64::MAX] {
            for size in [0u8, 1, 2, 3, 4, 8, 255] {
                for v in [0u32, 0x10, 0x11, 0x3F, 0x40, 0xFF, 0x0001_8000, 0xFFFF_FFFF] {
                    for sel in [0u32, 1, 2, 0x10, 0x2F, 0x3E, 0x3F, 0x40, 0xFF] {
                        io.mmio_write(IOREGSEL, 4, sel);
                        io.mmio_write(offset, size, v);
                        let _ = io.mmio_read(offset, size);
                    }
                    io.set_irq(v as u8, v & 1 == 0);
                    io.eoi(v as u8);
                    io.take_deliveries(&mut |_| {});
                }
            }
        }
        for pin in 0..=255u8 {
            io.set_irq(pin, true);
            let _ = io.redirection_entry(pin);
        }
        io.take_deliveries(&mut |_| {});
    }
}
