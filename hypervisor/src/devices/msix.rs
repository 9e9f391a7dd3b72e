//! MSI-X for a PCI function (PCI Local Bus Specification 3.0 §6.8.2): the capability in
//! configuration space, the vector table and the pending bit array (PBA), both in a memory
//! BAR, and the delivery of a vector's message to the local APICs.
//!
//! Capability (§6.8.2.1-6.8.2.5, 12 bytes): ID 0x11, next pointer, Message Control (table
//! size - 1 in bits 10:0, read-only; Function Mask bit 14; MSI-X Enable bit 15), Table
//! Offset/BIR and PBA Offset/BIR (BAR index in bits 2:0, QWORD-aligned offset above).
//!
//! Table entry (§6.8.2.6-6.8.2.9, 16 bytes): Message Address (bits 1:0 read 0), Message Upper
//! Address, Message Data, Vector Control (bit 0 Mask, set at reset; the rest reserved, 0).
//! PBA: one read-only bit per vector.
//!
//! Signalling a vector (§6.8.2.9): with MSI-X enabled, a vector that is masked (its own Mask
//! bit or the Function Mask) gets its pending bit set instead of a message; when it is unmasked
//! with the bit set, the message goes out then and the bit clears. With MSI-X disabled the
//! function uses INTx ([`Msix::signal`] says so and the caller asserts its pin).
//!
//! The message (Intel SDM Vol. 3A §11.11, "Message Signalled Interrupts"): address
//! 0xFEEx_xxxx with the destination ID in bits 19:12, redirection hint bit 3 and destination
//! mode bit 2 (logical only with the hint set; otherwise physical); data with the vector in
//! bits 7:0, the delivery mode in bits 10:8, level bit 14, trigger mode bit 15. Anything else
//! (an address outside 0xFEEx_xxxx, a reserved delivery mode, ExtINT) is a write to memory no
//! interrupt controller answers and is dropped. Messages go through
//! [`Interrupts::deliver`], the path of the I/O APIC and of IPIs.

use alloc::{sync::Arc, vec::Vec};

use super::irq::{DeliveryMode, Destination, Message};
use super::irqchip::Interrupts;

/// Capability ID of MSI-X (PCI 3.0 Appendix H).
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The largest table: Table Size is 11 bits (N - 1).
pub const MAX_VECTORS: u16 = 2048;
/// Message Control: MSI-X Enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// The Message Control bits software may write.
pub const CONTROL_WRITABLE: u16 = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
/// Vector Control: Mask Bit.
const VECTOR_MASKED: u32 = 1;
/// Message addresses that reach the local APICs: 0xFEEx_xxxx.
const MSI_ADDRESS_MASK: u64 = 0xFFF0_0000;
const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;
const MSI_REDIRECTION_HINT: u64 = 1 << 3;
const MSI_DEST_LOGICAL: u64 = 1 << 2;

/// The capability structure as it sits in configuration space (§6.8.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixCapability {
    pub cap_id: u8,
    pub next: u8,
    pub control: u16,
    /// Table offset | table BIR.
    pub table: u32,
    /// PBA offset | PBA BIR.
    pub pba: u32,
}

const _: () = assert!(core::mem::size_of::<MsixCapability>() == 12);

impl MsixCapability {
    /// Little-endian bytes for configuration space.
    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.cap_id;
        b[1] = self.next;
        b[2..4].copy_from_slice(&self.control.to_le_bytes());
        b[4..8].copy_from_slice(&self.table.to_le_bytes());
        b[8..12].copy_from_slice(&self.pba.to_le_bytes());
        b
    }
}

/// Decodes an MSI (address, data) pair into an APIC message (SDM Vol. 3A §11.11.1, §11.11.2);
/// `None` if it does not address the local APICs or names a delivery mode an MSI cannot use.
pub fn msi_message(address: u64, data: u32) -> Option<Message> {
    if address >> 32 != 0 || address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
        return None;
    }
    let dest_id = ((address >> 12) & 0xFF) as u32;
    // Destination mode is only looked at with the redirection hint set (§11.11.1).
    let logical = address & MSI_REDIRECTION_HINT != 0 && address & MSI_DEST_LOGICAL != 0;
    let mode = match DeliveryMode::from_rte_bits(((data >> 8) & 7) as u8)? {
        DeliveryMode::ExtInt => return None,
        m => m,
    };
    Some(Message {
        mode,
        vector: data as u8,
        level_assert: true,
        // MSIs are edge-triggered: the trigger bit only qualifies INIT (§11.11.2).
        trigger_level: false,
        dest: if logical { Destination::Logical(dest_id) } else { Destination::Physical(dest_id) },
    })
}

/// A function's MSI-X state: the table, the pending bits and the two control bits.
pub struct Msix {
    /// `vectors` entries of [`ENTRY_SIZE`] bytes, little-endian.
    table: Vec<u8>,
    pending: Vec<u64>,
    control: u16,
    irq: Arc<Interrupts>,
    /// Messages sent and messages dropped (not an interrupt address).
    pub sent: u64,
    pub dropped: u64,
}

impl Msix {
    /// `vectors` entries (1..=[`MAX_VECTORS`], clamped), all masked, MSI-X disabled.
    pub fn new(vectors: u16, irq: Arc<Interrupts>) -> Self {
        let n = vectors.clamp(1, MAX_VECTORS);
        let mut m = Msix {
            table: alloc::vec![0; usize::from(n) * ENTRY_SIZE as usize],
            pending: alloc::vec![0; usize::from(n).div_ceil(64)],
            control: 0,
            irq,
            sent: 0,
            dropped: 0,
        };
        m.reset();
        m
    }

    /// Reset state (§6.8.2.9): every vector masked, nothing pending, MSI-X disabled.
    pub fn reset(&mut self) {
        self.table.fill(0);
        for v in 0..self.vectors() {
            self.set_entry_u32(v, 12, VECTOR_MASKED);
        }
        self.pending.fill(0);
        self.control = 0;
    }

    pub fn vectors(&self) -> u16 {
        (self.table.len() / ENTRY_SIZE as usize) as u16
    }

    /// Bytes of the table in its BAR.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64
    }

    /// Bytes of the PBA in its BAR (whole QWORDs).
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability, with Message Control as it stands now.
    pub fn capability(
        &self,
        next: u8,
        table_bir: u8,
        table_offset: u32,
        pba_bir: u8,
        pba_offset: u32,
    ) -> MsixCapability {
        MsixCapability {
            cap_id: CAP_ID_MSIX,
            next,
            control: self.control | (self.vectors() - 1),
            table: (table_offset & !7) | u32::from(table_bir & 7),
            pba: (pba_offset & !7) | u32::from(pba_bir & 7),
        }
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    pub fn function_masked(&self) -> bool {
        self.control & CONTROL_FUNCTION_MASK != 0
    }

    /// Software wrote Message Control (only Enable and Function Mask count): vectors that
    /// became deliverable and are pending go out now.
    pub fn set_control(&mut self, control: u16) {
        self.control = control & CONTROL_WRITABLE;
        self.flush_pending();
    }

    fn entry_u32(&self, vector: u16, offset: usize) -> u32 {
        let o = usize::from(vector) * ENTRY_SIZE as usize + offset;
        match self.table.get(o..o + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    fn set_entry_u32(&mut self, vector: u16, offset: usize, v: u32) {
        let o = usize::from(vector) * ENTRY_SIZE as usize + offset;
        if let Some(b) = self.table.get_mut(o..o + 4) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn masked(&self, vector: u16) -> bool {
        self.function_masked() || self.entry_u32(vector, 12) & VECTOR_MASKED != 0
    }

    fn is_pending(&self, vector: u16) -> bool {
        self.pending.get(usize::from(vector / 64)).is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: u16, on: bool) {
        if let Some(w) = self.pending.get_mut(usize::from(vector / 64)) {
            if on {
                *w |= 1 << (vector % 64);
            } else {
                *w &= !(1 << (vector % 64));
            }
        }
    }

    /// The function signals `vector`: `false` if MSI-X is disabled (the function uses INTx
    /// instead) or `vector` is not in the table (nothing happens); `true` otherwise, the
    /// message sent or, masked, left pending.
    pub fn signal(&mut self, vector: u16) -> bool {
        if !self.enabled() || vector >= self.vectors() {
            return false;
        }
        if self.masked(vector) {
            self.set_pending(vector, true);
        } else {
            self.send(vector);
        }
        true
    }

    fn send(&mut self, vector: u16) {
        let address = u64::from(self.entry_u32(vector, 0)) | u64::from(self.entry_u32(vector, 4)) << 32;
        let data = self.entry_u32(vector, 8);
        match msi_message(address, data) {
            Some(msg) => {
                self.sent += 1;
                self.irq.deliver(None, &msg);
            }
            None => self.dropped += 1,
        }
    }

    fn flush_pending(&mut self) {
        if !self.enabled() || self.function_masked() {
            return;
        }
        for v in 0..self.vectors() {
            if self.is_pending(v) && !self.masked(v) {
                self.set_pending(v, false);
                self.send(v);
            }
        }
    }

    /// A read of `size` bytes at `offset` into the table; outside it reads all ones.
    pub fn table_read(&self, offset: u64, size: u8) -> u64 {
        read_bytes(&self.table, offset, size)
    }

    /// A write to the table: Message Address bits 1:0 and Vector Control bits 31:1 stay 0;
    /// unmasking a pending vector sends it.
    pub fn table_write(&mut self, offset: u64, size: u8, value: u64) {
        let n = usize::from(size.clamp(1, 8));
        for i in 0..n {
            let Some(o) = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok()) else { return };
            let Some(slot) = self.table.get_mut(o) else { return };
            let byte = (value >> (8 * i)) as u8;
            *slot = match o % ENTRY_SIZE as usize {
                0 => byte & !3,
                12 => byte & VECTOR_MASKED as u8,
                13..=15 => 0,
                _ => byte,
            };
        }
        self.flush_pending();
    }

    /// A read of the PBA (read-only: writes are ignored).
    pub fn pba_read(&self, offset: u64, size: u8) -> u64 {
        let bytes: Vec<u8> = self.pending.iter().flat_map(|w| w.to_le_bytes()).collect();
        read_bytes(&bytes, offset, size)
    }
}

/// `size` (1..=8) little-endian bytes of `bytes` from `offset`; bytes past the end read 0xFF.
pub fn read_bytes(bytes: &[u8], offset: u64, size: u8) -> u64 {
    let mut v = 0u64;
    for i in 0..u64::from(size.clamp(1, 8)) {
        let b = offset
            .checked_add(i)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| bytes.get(o))
            .copied()
            .unwrap_or(0xFF);
        v |= u64::from(b) << (8 * i);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irqchip::no_kick;

    fn irr_has(irq: &Interrupts, vcpu: usize, vector: u8) -> bool {
        let reg = irq.apic(vcpu).lapic.lock().mmio_read(0x200 + 0x10 * u32::from(vector / 32), Default::default());
        reg & (1 << (vector % 32)) != 0
    }

    fn program(m: &mut Msix, v: u16, address: u64, data: u32, masked: bool) {
        let base = u64::from(v) * ENTRY_SIZE;
        m.table_write(base, 8, address);
        m.table_write(base + 8, 4, u64::from(data));
        m.table_write(base + 12, 4, u64::from(masked));
    }

    #[test]
    fn message_format() {
        let m = msi_message(0xFEE0_1000, 0x41).unwrap();
        assert_eq!(
            (m.mode, m.vector, m.dest, m.trigger_level),
            (DeliveryMode::Fixed, 0x41, Destination::Physical(1), false)
        );
        // Destination mode counts only with the redirection hint.
        assert_eq!(msi_message(0xFEE0_3004, 0x30).unwrap().dest, Destination::Physical(3));
        assert_eq!(msi_message(0xFEE0_300C, 0x130).unwrap().dest, Destination::Logical(3));
        assert_eq!(msi_message(0xFEE0_300C, 0x130).unwrap().mode, DeliveryMode::LowestPriority);
        assert_eq!(msi_message(0xFEE0_0000, 0x400).unwrap().mode, DeliveryMode::Nmi);
        // Not an interrupt: elsewhere in memory, above 4 GiB, reserved or ExtINT modes.
        assert_eq!(msi_message(0xFED0_0000, 0x41), None);
        assert_eq!(msi_message(0x1_FEE0_0000, 0x41), None);
        assert_eq!(msi_message(0xFEE0_0000, 0x341), None);
        assert_eq!(msi_message(0xFEE0_0000, 0x741), None);
    }

    #[test]
    fn masking_pending_and_delivery() {
        let irq = Interrupts::new(2, true, 1_000_000_000, no_kick);
        for v in 0..2 {
            // Software-enable the local APICs (SVR bit 8): a disabled one drops interrupts.
            irq.apic(v).lapic.lock().mmio_write(0xF0, 0x1FF, Default::default());
        }
        let mut m = Msix::new(3, irq.clone());
        assert_eq!(
            m.capability(0x50, 0, 0x4000, 0, 0x5000).to_bytes(),
            [0x11, 0x50, 2, 0, 0, 0x40, 0, 0, 0, 0x50, 0, 0]
        );
        // Reset: every vector masked.
        assert_eq!(m.table_read(12, 4), 1);
        assert_eq!(m.table_read(3 * 16, 4), 0xFFFF_FFFF, "past the table");
        // Disabled: the function uses INTx.
        assert!(!m.signal(0));
        m.set_control(CONTROL_ENABLE | 0x7FF);
        assert!(m.enabled() && !m.function_masked());
        program(&mut m, 1, 0xFEE0_1003, 0x51, true);
        assert_eq!(m.table_read(16, 8), 0xFEE0_1000, "address bits 1:0 read 0");
        assert!(!m.signal(3), "no such vector");
        // Masked: pending, nothing delivered.
        assert!(m.signal(1));
        assert_eq!(m.pba_read(0, 8), 0b10);
        assert!(!irr_has(&irq, 1, 0x51));
        // Unmasking sends it (to APIC ID 1 only) and clears the bit.
        m.table_write(16 + 12, 4, 0xFFFF_FFFE);
        assert_eq!(m.table_read(16 + 12, 4), 0, "reserved bits stay 0");
        assert!(irr_has(&irq, 1, 0x51) && !irr_has(&irq, 0, 0x51));
        assert_eq!((m.pba_read(0, 8), m.sent), (0, 1));
        // The function mask holds everything back; clearing it releases.
        program(&mut m, 0, 0xFEE0_0000, 0x62, false);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.signal(0));
        assert!(!irr_has(&irq, 0, 0x62));
        assert_eq!(m.pba_read(0, 1), 1);
        m.set_control(CONTROL_ENABLE);
        assert!(irr_has(&irq, 0, 0x62));
        // A message that is no interrupt is dropped.
        program(&mut m, 2, 0x1000, 0x70, false);
        assert!(m.signal(2));
        assert_eq!(m.dropped, 1);
        m.reset();
        assert!(!m.enabled() && m.table_read(12, 4) == 1 && m.pba_read(0, 8) == 0);
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let irq = Interrupts::new(1, true, 1_000_000_000, no_kick);
        let mut m = Msix::new(MAX_VECTORS + 5, irq);
        assert_eq!(m.vectors(), MAX_VECTORS);
        m.set_control(0xFFFF);
        for off in [0u64, 7, 15, 16 * 2047 + 15, 16 * 2048, u64::MAX - 3, u64::MAX] {
            for size in [0u8, 1, 2, 3, 4, 8, 200] {
                m.table_write(off, size, u64::MAX);
                let _ = m.table_read(off, size);
                let _ = m.pba_read(off, size);
            }
        }
        for v in [0, 1, 2047, 2048, u16::MAX] {
            let _ = m.signal(v);
        }
    }
}
