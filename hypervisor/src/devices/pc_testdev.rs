//! QEMU's PC test device (`-device pc-testdev`), which kvm-unit-tests and similar kernels
//! use:
//! - ports 0xE0-0xE3: a 32-bit register; an access of N bytes at 0xE0 + k reads or writes
//!   its bytes k..k+N (byte lanes);
//! - ports 0xE4-0xE7: "flush page" (a 4-byte write names a page QEMU re-protects, to make
//!   the guest re-fetch code); nothing to do under Vireo, reads 0;
//! - ports 0xE8-0xEB: the same register, for the width-echo test (QEMU splits wider
//!   accesses into bytes, which gives the same result);
//! - ports 0x2000-0x2017: IRQ line control: a byte write of V at 0x2000 + n sets ISA IRQ /
//!   GSI n (0-23) to level V != 0; reads 0;
//! - MMIO 0xFF00_0000-0xFF00_FFFF: 64 KiB of plain memory.

use alloc::{sync::Arc, vec::Vec};

use super::{
    bus::{BusEffect, Ctx, Device, Range},
    irqchip::{Interrupts, IrqLine},
};

pub const DATA_PORT: u16 = 0xE0;
pub const FLUSH_PORT: u16 = 0xE4;
pub const BYTE_PORT: u16 = 0xE8;
pub const IRQ_PORT: u16 = 0x2000;
pub const IRQ_LINES: u16 = 24;
pub const IOMEM_BASE: u64 = 0xFF00_0000;
pub const IOMEM_LEN: u64 = 0x1_0000;

pub struct PcTestdev {
    data: u32,
    lines: Vec<IrqLine>,
    iomem: Vec<u8>,
}

impl PcTestdev {
    pub const RANGES: [Range; 5] = [
        Range::port(DATA_PORT, 4),
        Range::port(FLUSH_PORT, 4),
        Range::port(BYTE_PORT, 4),
        Range::port(IRQ_PORT, IRQ_LINES),
        Range::mmio(IOMEM_BASE, IOMEM_LEN),
    ];

    pub fn new(irq: &Arc<Interrupts>) -> Self {
        Self {
            data: 0,
            lines: (0..IRQ_LINES as u8).map(|n| IrqLine::new(irq.clone(), n)).collect(),
            iomem: alloc::vec![0; IOMEM_LEN as usize],
        }
    }

    /// The byte lanes of the 32-bit register an access of `size` bytes at lane `lane` covers.
    fn lanes(lane: u64, size: u8) -> (u32, u32) {
        let shift = (lane as u32 & 3) * 8;
        let bits = (size.min(4) as u32) * 8;
        let mask = if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 };
        (mask << shift, shift)
    }
}

fn in_port(addr: u64, base: u16, len: u16) -> bool {
    (base as u64..base as u64 + len as u64).contains(&addr)
}

impl Device for PcTestdev {
    fn name(&self) -> &'static str {
        "pc-testdev"
    }

    fn read(&mut self, addr: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
        if in_port(addr, DATA_PORT, 4) || in_port(addr, BYTE_PORT, 4) {
            let (mask, shift) = Self::lanes(addr, size);
            return ((self.data & mask) >> shift) as u64;
        }
        if (IOMEM_BASE..IOMEM_BASE + IOMEM_LEN).contains(&addr) {
            let off = (addr - IOMEM_BASE) as usize;
            let mut b = [0u8; 8];
            let n = (size as usize).min(8).min(self.iomem.len() - off);
            b[..n].copy_from_slice(&self.iomem[off..off + n]);
            return u64::from_le_bytes(b);
        }
        0
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, _cx: &Ctx<'_>) -> BusEffect {
        if in_port(addr, DATA_PORT, 4) || in_port(addr, BYTE_PORT, 4) {
            let (mask, shift) = Self::lanes(addr, size);
            self.data = (self.data & !mask) | (((value as u32) << shift) & mask);
        } else if in_port(addr, IRQ_PORT, IRQ_LINES) {
            if let Some(line) = self.lines.get_mut((addr - IRQ_PORT as u64) as usize) {
                line.set(value & 0xFF != 0);
            }
        } else if (IOMEM_BASE..IOMEM_BASE + IOMEM_LEN).contains(&addr) {
            let off = (addr - IOMEM_BASE) as usize;
            let n = (size as usize).min(8).min(self.iomem.len() - off);
            self.iomem[off..off + n].copy_from_slice(&value.to_le_bytes()[..n]);
        }
        // 0xE4 (flush page): nothing to flush.
        BusEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        devices::{
            bus::{device, Bus, Space},
            irqchip::no_kick,
            time::Nanos,
        },
        mm::FrameAllocator,
        vmm::guest_mem::GuestMemory,
    };

    #[test]
    fn registers_lanes_memory_and_irq_lines() {
        let irq = Interrupts::new(1, true, 1_000_000_000, no_kick);
        let mut bus = Bus::new();
        bus.add(device(PcTestdev::new(&irq)), &PcTestdev::RANGES).unwrap();
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        bus.write(Space::Port, 0xE0, 4, 0x1122_3344, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0xE0, 4, &cx), Some(0x1122_3344));
        assert_eq!(bus.read(Space::Port, 0xE1, 1, &cx), Some(0x33), "byte lanes");
        assert_eq!(bus.read(Space::Port, 0xE2, 2, &cx), Some(0x1122));
        bus.write(Space::Port, 0xE9, 1, 0xAB, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0xE8, 4, &cx), Some(0x1122_AB44), "0xE8 is the same register");
        bus.write(Space::Port, 0xE8, 2, 0xBEEF, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0xE0, 4, &cx), Some(0x1122_BEEF));
        // Flush page: accepted, reads 0.
        assert_eq!(bus.write(Space::Port, 0xE4, 4, 0x1000, &cx), Some(BusEffect::None));
        assert_eq!(bus.read(Space::Port, 0xE4, 4, &cx), Some(0));
        // The MMIO window is memory.
        bus.write(Space::Mmio, IOMEM_BASE + 0x10, 8, 0x0102_0304_0506_0708, &cx).unwrap();
        assert_eq!(bus.read(Space::Mmio, IOMEM_BASE + 0x12, 2, &cx), Some(0x0506));
        bus.write(Space::Mmio, IOMEM_BASE + IOMEM_LEN - 1, 4, 0xFFFF_FF77, &cx).unwrap();
        assert_eq!(bus.read(Space::Mmio, IOMEM_BASE + IOMEM_LEN - 1, 4, &cx), Some(0x77), "clipped at the end");
        assert!(bus.read(Space::Port, 0x2000 + 24, 1, &cx).is_none(), "24 lines");
    }

    #[test]
    fn an_irq_line_reaches_the_pic() {
        let irq = Interrupts::new(1, false, 1_000_000_000, no_kick);
        let mut bus = Bus::new();
        crate::devices::pc::build(&mut bus, &irq, "t", 0, Default::default()).unwrap();
        bus.add(device(PcTestdev::new(&irq)), &PcTestdev::RANGES).unwrap();
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        // The master 8259: ICW1-4 (vectors from 0x20), nothing masked.
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0x00)] {
            bus.write(Space::Port, port, 1, v, &cx).unwrap();
        }
        assert_eq!(irq.pic_pending(), None);
        bus.write(Space::Port, 0x2003, 1, 1, &cx).unwrap();
        assert_eq!(irq.pic_pending(), Some(0x23), "IRQ 3 raised through port 0x2003");
        bus.write(Space::Port, 0x2003, 1, 0, &cx).unwrap();
        // Edge-triggered: the request stays latched until it is acknowledged, once.
        assert_eq!(irq.pic_acknowledge(), Some(0x23));
        assert_eq!(irq.pic_pending(), None);
    }
}
