//! PCI configuration space through configuration mechanism #1 (PCI Local Bus Specification
//! 3.0, §3.2.2.3.2), with a host bridge at bus 0, device 0, function 0.
//!
//! CONFIG_ADDRESS is the dword at 0xCF8: bit 31 enable, bits 23:16 bus, 15:11 device, 10:8
//! function, 7:2 register. Bits 30:24 (reserved) and 1:0 read as 0. Only a 32-bit access at
//! 0xCF8 reaches it; byte and word accesses to 0xCF8-0xCFB are ordinary I/O (0xCF9 is the
//! reset control register, see `pm`), as the specification requires.
//! CONFIG_DATA is 0xCFC-0xCFF: a byte, word or dword access at 0xCFC + k reaches bytes
//! k.. of the selected register (bytes past the dword read as all ones and are not written).
//! With the enable bit clear, or for a function that does not exist, reads return all ones
//! and writes are ignored.
//!
//! The host bridge is an Intel 440FX PMC (82441FX: vendor 0x8086, device 0x1237, revision
//! 0x02, class 0x060000, header type 0), the one QEMU's `pc` machine presents: a plain PCI
//! host bridge, which fits a platform that offers configuration mechanism #1 only (the Q35
//! MCH would imply PCI Express and an MCFG/ECAM window). Its chipset registers (PAM, SMRAM,
//! DRAM rows) are not modelled: they read 0 and ignore writes; only the command register's
//! SERR#/parity enables and the latency timer are writable.
//!
//! More functions are added with [`PciBus::add`]: anything implementing [`PciFunction`], most
//! simply a [`ConfigSpace`] (a 256-byte space with a per-bit write mask, which also gives BAR
//! sizing for free: a BAR whose writable bits are `!(size - 1)` reads back the size mask after
//! the guest writes all ones).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use super::bus::{BusEffect, Ctx, Device, Range};
use super::time::{all_ones, read_lanes, write_lanes};

pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
pub const CONFIG_DATA_PORT: u16 = 0xCFC;

/// CONFIG_ADDRESS bits that exist: enable, bus, device, function, register.
const ADDRESS_MASK: u32 = 0x80FF_FFFC;
const ADDRESS_ENABLE: u32 = 0x8000_0000;

/// A function's address on the PCI bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub bus: u8,
    /// 0..32
    pub device: u8,
    /// 0..8
    pub function: u8,
}

impl Bdf {
    /// The host bridge's address.
    pub const HOST_BRIDGE: Bdf = Bdf { bus: 0, device: 0, function: 0 };

    /// `None` if `device` >= 32 or `function` >= 8.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        if device < 32 && function < 8 {
            Some(Bdf { bus, device, function })
        } else {
            None
        }
    }

    /// The function a CONFIG_ADDRESS value selects.
    pub const fn from_address(address: u32) -> Self {
        Bdf { bus: (address >> 16) as u8, device: ((address >> 11) & 0x1F) as u8, function: ((address >> 8) & 7) as u8 }
    }
}

/// One PCI function's configuration space, as the bus sees it.
pub trait PciFunction: Send {
    /// Reads the dword at `offset` (a multiple of 4, below 256).
    fn config_read(&mut self, offset: u8) -> u32;
    /// Writes the bytes of `value` that `byte_mask` selects (0xFF << 8k for byte k) into the
    /// dword at `offset` (a multiple of 4, below 256).
    fn config_write(&mut self, offset: u8, value: u32, byte_mask: u32);
    /// The size of memory BAR `bar` (0..6), a power of two of at least 16 bytes, or 0 where
    /// the function has none. The bus decodes the BAR's address from configuration space
    /// (§6.2.5.1: bit 0 clear for memory, bits 2:1 = 10b for a 64-bit BAR whose upper half is
    /// the next register) while the command register's Memory Space bit is set.
    fn mem_bar_size(&self, _bar: u8) -> u64 {
        0
    }
    /// A read of `size` bytes at `offset` into memory BAR `bar` (the access lies wholly in it).
    fn bar_read(&mut self, _bar: u8, _offset: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
        all_ones(size).into()
    }
    /// A write of the low `size` bytes of `value` at `offset` into memory BAR `bar`.
    fn bar_write(&mut self, _bar: u8, _offset: u64, _size: u8, _value: u64, _cx: &Ctx<'_>) {}
    /// Work that came from outside the VM (a frame from another VM's NIC), done on one of
    /// the VM's own vCPUs (see [`PciFunction::next_deadline`]).
    fn tick(&mut self, _cx: &Ctx<'_>) {}
    /// The earliest guest time the function needs a [`PciFunction::tick`].
    fn next_deadline(&self) -> Option<super::time::Nanos> {
        None
    }
}

/// Command register (offset 0x04) bits (§6.2.2).
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: Interrupt Status (INTx asserted) and Capabilities List.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Header offsets (§6.1).
pub const OFFSET_COMMAND: u8 = 0x04;
pub const OFFSET_STATUS: u8 = 0x06;
pub const OFFSET_BAR0: u8 = 0x10;
pub const OFFSET_SUBSYSTEM_VENDOR: u8 = 0x2C;
pub const OFFSET_SUBSYSTEM: u8 = 0x2E;
pub const OFFSET_CAPABILITIES: u8 = 0x34;
pub const OFFSET_INTERRUPT_LINE: u8 = 0x3C;
pub const OFFSET_INTERRUPT_PIN: u8 = 0x3D;
/// BAR type bits: a 64-bit memory BAR.
pub const BAR_MEM_64: u32 = 0b100;

/// A 256-byte configuration space with a write mask: guest writes change only the bits set
/// in the mask; everything else is read-only.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
}

impl ConfigSpace {
    /// A type-0 header with the given identity (`class` = base class << 16 | subclass << 8 |
    /// programming interface), everything else 0 and read-only.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, header_type: u8) -> Self {
        let mut space = Self { bytes: [0; 256], writable: [0; 256] };
        space.set_u16(0x00, vendor);
        space.set_u16(0x02, device);
        space.set_u32(0x08, (class << 8) | revision as u32);
        space.set_u8(0x0E, header_type);
        space
    }

    /// The byte at `offset`.
    pub fn get_u8(&self, offset: u8) -> u8 {
        self.bytes[offset as usize]
    }

    /// The little-endian word at `offset` (bytes past 255 read 0).
    pub fn get_u16(&self, offset: u8) -> u16 {
        let o = offset as usize;
        u16::from_le_bytes([self.bytes[o], self.bytes.get(o + 1).copied().unwrap_or(0)])
    }

    /// Copies `bytes` in from the device side from `offset` (cut at 255).
    pub fn set_slice(&mut self, offset: u8, bytes: &[u8]) {
        self.set_bytes(offset, bytes);
    }

    pub fn set_u8(&mut self, offset: u8, value: u8) {
        self.bytes[offset as usize] = value;
    }

    /// Sets a little-endian word from the device side (ignores the write mask); a word that
    /// would run past offset 255 is cut there.
    pub fn set_u16(&mut self, offset: u8, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: u8, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Makes the bits of `mask` (little-endian from `offset`) writable by the guest.
    pub fn set_writable(&mut self, offset: u8, mask: u32) {
        for (i, b) in mask.to_le_bytes().into_iter().enumerate() {
            if let Some(w) = self.writable.get_mut(offset as usize + i) {
                *w = b;
            }
        }
    }

    /// The dword at `offset & 0xFC`.
    pub fn read_u32(&self, offset: u8) -> u32 {
        let o = (offset & 0xFC) as usize;
        u32::from_le_bytes([self.bytes[o], self.bytes[o + 1], self.bytes[o + 2], self.bytes[o + 3]])
    }

    fn set_bytes(&mut self, offset: u8, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(slot) = self.bytes.get_mut(offset as usize + i) {
                *slot = b;
            }
        }
    }
}

impl PciFunction for ConfigSpace {
    fn config_read(&mut self, offset: u8) -> u32 {
        self.read_u32(offset)
    }

    fn config_write(&mut self, offset: u8, value: u32, byte_mask: u32) {
        let o = (offset & 0xFC) as usize;
        for i in 0..4 {
            let lane = 0xFFu32 << (8 * i);
            if byte_mask & lane == 0 {
                continue;
            }
            let w = self.writable[o + i];
            let v = (value >> (8 * i)) as u8;
            self.bytes[o + i] = (self.bytes[o + i] & !w) | (v & w);
        }
    }
}

/// The 440FX host bridge's configuration space.
pub fn i440fx_host_bridge() -> ConfigSpace {
    let mut space = ConfigSpace::new(0x8086, 0x1237, 0x06_00_00, 0x02, 0x00);
    space.set_u16(0x04, 0x0006); // memory access and bus master enables, hardwired
    space.set_u16(0x06, 0x0280); // fast back-to-back capable, medium DEVSEL timing
    space.set_writable(0x04, 0x0140); // SERR# enable, parity error response
    space.set_writable(0x0C, 0x0000_FF00); // latency timer
    space
}

/// Why [`PciBus::add`] refused a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddError {
    /// Something already answers at that address.
    Occupied,
}

/// Configuration mechanism #1 and the functions behind it.
pub struct PciBus {
    address: u32,
    functions: Vec<(Bdf, Box<dyn PciFunction>)>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let bdfs: Vec<Bdf> = self.functions.iter().map(|(bdf, _)| *bdf).collect();
        f.debug_struct("PciBus").field("address", &self.address).field("functions", &bdfs).finish()
    }
}

impl PciBus {
    /// A bus with the 440FX host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut bus = Self { address: 0, functions: Vec::new() };
        bus.functions.push((Bdf::HOST_BRIDGE, Box::new(i440fx_host_bridge())));
        bus
    }

    /// Attaches a function at `bdf`.
    pub fn add(&mut self, bdf: Bdf, function: Box<dyn PciFunction>) -> Result<(), AddError> {
        if self.functions.iter().any(|(b, _)| *b == bdf) {
            return Err(AddError::Occupied);
        }
        self.functions.push((bdf, function));
        Ok(())
    }

    /// Whether an access of `size` bytes at `port` is the bus's: a dword at 0xCF8, or any
    /// access at 0xCFC-0xCFF.
    pub fn handles(&self, port: u16, size: u8) -> bool {
        (port == CONFIG_ADDRESS_PORT && size == 4) || (CONFIG_DATA_PORT..CONFIG_DATA_PORT + 4).contains(&port)
    }

    /// An IN of `size` bytes at `port`; accesses the bus does not handle read all ones.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        if !self.handles(port, size) {
            return all_ones(size);
        }
        if port == CONFIG_ADDRESS_PORT {
            return self.address;
        }
        if self.address & ADDRESS_ENABLE == 0 {
            return all_ones(size);
        }
        let dword = self.config_read(Bdf::from_address(self.address), self.address as u8);
        read_lanes(dword, 4, port - CONFIG_DATA_PORT, size)
    }

    /// An OUT of `size` bytes at `port`; accesses the bus does not handle are ignored.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        if !self.handles(port, size) {
            return;
        }
        if port == CONFIG_ADDRESS_PORT {
            self.address = value & ADDRESS_MASK;
            return;
        }
        if self.address & ADDRESS_ENABLE == 0 {
            return;
        }
        let (bits, mask) = write_lanes(4, port - CONFIG_DATA_PORT, size, value);
        self.config_write(Bdf::from_address(self.address), self.address as u8, bits, mask);
    }

    /// Reads the dword at `offset & 0xFC` of function `bdf` (all ones if absent).
    pub fn config_read(&mut self, bdf: Bdf, offset: u8) -> u32 {
        match self.function(bdf) {
            Some(f) => f.config_read(offset & 0xFC),
            None => 0xFFFF_FFFF,
        }
    }

    /// Writes the bytes of `value` selected by `byte_mask` at `offset & 0xFC` of `bdf`.
    pub fn config_write(&mut self, bdf: Bdf, offset: u8, value: u32, byte_mask: u32) {
        if let Some(f) = self.function(bdf) {
            f.config_write(offset & 0xFC, value, byte_mask);
        }
    }

    fn function(&mut self, bdf: Bdf) -> Option<&mut (dyn PciFunction + 'static)> {
        self.functions.iter_mut().find(|(b, _)| *b == bdf).map(|(_, f)| f.as_mut())
    }

    /// The function, memory BAR and offset an access of `size` bytes at guest-physical `addr`
    /// reaches: a BAR of a function with memory decoding on that holds the whole access. BARs
    /// are where the guest put them, checked at each access (the guest may move them at any
    /// time); a BAR left at 0 (unassigned) decodes nothing; where two overlap (a guest
    /// error), the first function added wins.
    fn route(&mut self, addr: u64, size: u8) -> Option<(usize, u8, u64)> {
        let len = u64::from(size.max(1));
        for (i, (_, f)) in self.functions.iter_mut().enumerate() {
            if f.config_read(OFFSET_COMMAND) as u16 & COMMAND_MEMORY == 0 {
                continue;
            }
            let mut bar = 0u8;
            while bar < 6 {
                let reg = f.config_read(OFFSET_BAR0 + 4 * bar);
                let wide = reg & 1 == 0 && reg & 0b110 == BAR_MEM_64;
                let size = f.mem_bar_size(bar);
                if reg & 1 == 0 && size.is_power_of_two() {
                    let mut base = u64::from(reg & !0xF);
                    if wide && bar < 5 {
                        base |= u64::from(f.config_read(OFFSET_BAR0 + 4 * (bar + 1))) << 32;
                    }
                    let base = base & !(size - 1);
                    if base != 0 {
                        if let Some(offset) = addr.checked_sub(base).filter(|o| o.saturating_add(len) <= size) {
                            return Some((i, bar, offset));
                        }
                    }
                }
                bar += if wide { 2 } else { 1 };
            }
        }
        None
    }

    /// A memory read at `addr` through the BARs; `None` if no BAR decodes it.
    pub fn mmio_read(&mut self, addr: u64, size: u8, cx: &Ctx<'_>) -> Option<u64> {
        let (i, bar, offset) = self.route(addr, size)?;
        Some(self.functions[i].1.bar_read(bar, offset, size, cx))
    }

    /// A memory write at `addr` through the BARs; `false` if no BAR decodes it.
    pub fn mmio_write(&mut self, addr: u64, size: u8, value: u64, cx: &Ctx<'_>) -> bool {
        let Some((i, bar, offset)) = self.route(addr, size) else { return false };
        self.functions[i].1.bar_write(bar, offset, size, value, cx);
        true
    }
}

/// The root bridge's 32-bit memory window on the VM's bus (the DSDT `_CRS` window that Linux
/// assigns BARs from): an access in it goes to whichever function's memory BAR holds it
/// ([`PciBus::mmio_read`]); one no BAR decodes is a master abort, reading all ones.
pub struct PciWindow {
    pci: Arc<Mutex<PciBus>>,
    range: Range,
}

impl PciWindow {
    /// The window `[base, last]` of `pci`.
    pub fn new(pci: Arc<Mutex<PciBus>>, base: u64, last: u64) -> Self {
        Self { pci, range: Range::mmio(base, last.saturating_sub(base).saturating_add(1)) }
    }

    pub fn range(&self) -> Range {
        self.range
    }
}

impl Device for PciWindow {
    fn name(&self) -> &'static str {
        "pci-window"
    }

    fn read(&mut self, addr: u64, size: u8, cx: &Ctx<'_>) -> u64 {
        let ones = if size >= 8 { u64::MAX } else { (1u64 << (8 * u32::from(size))) - 1 };
        self.pci.lock().mmio_read(addr, size, cx).unwrap_or(ones)
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, cx: &Ctx<'_>) -> BusEffect {
        self.pci.lock().mmio_write(addr, size, value, cx);
        BusEffect::None
    }
}

impl PciBus {
    /// Bus ranges: CONFIG_ADDRESS (only its first port: 0xCF9 is the reset register) and
    /// CONFIG_DATA.
    pub const RANGES: [super::bus::Range; 2] =
        [super::bus::Range::port(CONFIG_ADDRESS_PORT, 1), super::bus::Range::port(CONFIG_DATA_PORT, 4)];
}

impl Device for PciBus {
    fn name(&self) -> &'static str {
        "pci"
    }

    fn read(&mut self, addr: u64, size: u8, _cx: &super::bus::Ctx<'_>) -> u64 {
        PciBus::read(self, addr as u16, size) as u64
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, _cx: &super::bus::Ctx<'_>) -> super::bus::BusEffect {
        PciBus::write(self, addr as u16, size, value as u32);
        super::bus::BusEffect::None
    }

    fn tick(&mut self, cx: &Ctx<'_>) {
        for (_, f) in &mut self.functions {
            if f.next_deadline().is_some_and(|t| t <= cx.now) {
                f.tick(cx);
            }
        }
    }

    fn next_deadline(&self) -> Option<super::time::Nanos> {
        self.functions.iter().fold(None, |acc, (_, f)| super::time::earliest(acc, f.next_deadline()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(bus: u32, dev: u32, func: u32, reg: u32) -> u32 {
        0x8000_0000 | bus << 16 | dev << 11 | func << 8 | (reg & 0xFC)
    }

    /// Linux 6.1 arch/x86/pci/direct.c: pci_check_type1(), then pci_conf1_read() of the host
    /// bridge's IDs, class (PCI_CLASS_DEVICE, a word at 0x0A) and header type.
    #[test]
    fn linux_type1_probe_and_host_bridge_ids() {
        let mut pci = PciBus::new();
        assert!(!pci.handles(0xCFB, 1), "outb(0x01, 0xCFB) is not for mechanism #1");
        let tmp = pci.read(0xCF8, 4);
        pci.write(0xCF8, 4, 0x8000_0000);
        assert_eq!(pci.read(0xCF8, 4), 0x8000_0000);
        pci.write(0xCF8, 4, tmp);
        // Vendor and device.
        pci.write(0xCF8, 4, address(0, 0, 0, 0x00));
        assert_eq!(pci.read(0xCFC, 4), 0x1237_8086);
        assert_eq!(pci.read(0xCFC, 2), 0x8086);
        assert_eq!(pci.read(0xCFE, 2), 0x1237);
        // Class code: reg 0x08, word at offset 2.
        pci.write(0xCF8, 4, address(0, 0, 0, 0x0A));
        assert_eq!(pci.read(0xCFC + (0x0A & 3), 2), 0x0600, "PCI_CLASS_BRIDGE_HOST");
        pci.write(0xCF8, 4, address(0, 0, 0, 0x08));
        assert_eq!(pci.read(0xCFC, 1), 0x02, "revision");
        pci.write(0xCF8, 4, address(0, 0, 0, 0x0E));
        assert_eq!(pci.read(0xCFE, 1), 0x00, "header type 0, single function");
        // Everything else is absent.
        for (bus, dev, func) in [(0, 0, 1), (0, 1, 0), (0, 31, 7), (1, 0, 0), (255, 0, 0)] {
            pci.write(0xCF8, 4, address(bus, dev, func, 0));
            assert_eq!(pci.read(0xCFC, 4), 0xFFFF_FFFF);
            assert_eq!(pci.read(0xCFD, 1), 0xFF);
            assert_eq!(pci.read(0xCFE, 2), 0xFFFF);
        }
        // Enable bit clear: nothing.
        pci.write(0xCF8, 4, 0);
        assert_eq!(pci.read(0xCFC, 4), 0xFFFF_FFFF);
        // Reserved and low bits of CONFIG_ADDRESS read 0.
        pci.write(0xCF8, 4, 0xFFFF_FFFF);
        assert_eq!(pci.read(0xCF8, 4), 0x80FF_FFFC);
        // Byte/word accesses to 0xCF8 are not CONFIG_ADDRESS.
        pci.write(0xCF8, 1, 0);
        pci.write(0xCF8, 2, 0);
        assert_eq!(pci.read(0xCF8, 4), 0x80FF_FFFC);
        assert_eq!(pci.read(0xCF8, 2), 0xFFFF);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut pci = PciBus::new();
        let hb = Bdf::HOST_BRIDGE;
        pci.write(0xCF8, 4, address(0, 0, 0, 0));
        pci.write(0xCFC, 4, 0xDEAD_BEEF);
        assert_eq!(pci.read(0xCFC, 4), 0x1237_8086);
        // Command: only SERR# and parity enables change; status is read-only.
        pci.write(0xCF8, 4, address(0, 0, 0, 0x04));
        pci.write(0xCFC, 4, 0xFFFF_FFFF);
        assert_eq!(pci.read(0xCFC, 4), 0x0280_0146);
        pci.write(0xCFC, 2, 0);
        assert_eq!(pci.config_read(hb, 0x04), 0x0280_0006);
        // Latency timer is writable, cache line size is not.
        pci.write(0xCF8, 4, address(0, 0, 0, 0x0C));
        pci.write(0xCFC, 2, 0x40_20);
        assert_eq!(pci.read(0xCFC, 4), 0x0000_4000);
        // Bytes past the dword (a word at 0xCFF) are cut off.
        pci.write(0xCFF, 2, 0xFFFF);
        assert_eq!(pci.read(0xCFF, 2), 0xFF00);
    }

    #[test]
    fn functions_can_be_added_with_bar_sizing() {
        let mut pci = PciBus::new();
        let mut nic = ConfigSpace::new(0x1AF4, 0x1000, 0x02_00_00, 0, 0);
        nic.set_u32(0x10, 0x0000_C001); // I/O BAR, 32 bytes
        nic.set_writable(0x10, !0x1F);
        nic.set_writable(0x3C, 0xFF); // interrupt line
        let bdf = Bdf::new(0, 3, 0).unwrap();
        assert_eq!(pci.add(bdf, Box::new(nic.clone())), Ok(()));
        assert_eq!(pci.add(bdf, Box::new(nic)), Err(AddError::Occupied));
        assert_eq!(pci.add(Bdf::HOST_BRIDGE, Box::new(i440fx_host_bridge())), Err(AddError::Occupied));
        pci.write(0xCF8, 4, address(0, 3, 0, 0x10));
        assert_eq!(pci.read(0xCFC, 4), 0x0000_C001);
        pci.write(0xCFC, 4, 0xFFFF_FFFF);
        assert_eq!(pci.read(0xCFC, 4), 0xFFFF_FFE1, "size 32, I/O");
        pci.write(0xCFC, 4, 0x0000_D000);
        assert_eq!(pci.read(0xCFC, 4), 0x0000_D001);
        pci.write(0xCF8, 4, address(0, 3, 0, 0x3C));
        pci.write(0xCFC, 1, 11);
        assert_eq!(pci.read(0xCFC, 1), 11);
        assert_eq!(Bdf::new(0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 8), None);
        assert_eq!(Bdf::from_address(address(2, 3, 4, 0)), Bdf::new(2, 3, 4).unwrap());
    }

    /// The last BAR access: (bar, offset, size, value written or 0).
    type LastAccess = Arc<Mutex<Option<(u8, u64, u8, u64)>>>;

    /// A function with a 4 KiB 32-bit memory BAR 0 and a 64 KiB 64-bit BAR 2 that remembers
    /// the last access.
    struct Regs {
        space: ConfigSpace,
        last: LastAccess,
    }

    impl PciFunction for Regs {
        fn config_read(&mut self, offset: u8) -> u32 {
            self.space.config_read(offset)
        }
        fn config_write(&mut self, offset: u8, value: u32, byte_mask: u32) {
            self.space.config_write(offset, value, byte_mask)
        }
        fn mem_bar_size(&self, bar: u8) -> u64 {
            match bar {
                0 => 0x1000,
                2 => 0x1_0000,
                _ => 0,
            }
        }
        fn bar_read(&mut self, bar: u8, offset: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
            *self.last.lock() = Some((bar, offset, size, 0));
            0x1234
        }
        fn bar_write(&mut self, bar: u8, offset: u64, size: u8, value: u64, _cx: &Ctx<'_>) {
            *self.last.lock() = Some((bar, offset, size, value));
        }
    }

    #[test]
    fn memory_bars_decode_where_the_guest_puts_them() {
        use crate::{devices::time::Nanos, mm::FrameAllocator, vmm::guest_mem::GuestMemory};
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        let mut space = ConfigSpace::new(0x1AF4, 0x1043, 0x07_80_00, 1, 0);
        space.set_writable(0x04, COMMAND_MEMORY as u32);
        space.set_writable(0x10, !0xFFF);
        space.set_u32(0x18, BAR_MEM_64);
        space.set_writable(0x18, !0xFFFF);
        space.set_writable(0x1C, !0);
        let pci = Arc::new(Mutex::new(PciBus::new()));
        let last = Arc::new(Mutex::new(None));
        pci.lock().add(Bdf::new(0, 1, 0).unwrap(), Box::new(Regs { space, last: last.clone() })).unwrap();
        let mut window = PciWindow::new(pci.clone(), 0xC000_0000, 0xFEBF_FFFF);
        assert_eq!(window.range(), Range::mmio(0xC000_0000, 0x3EC0_0000));
        let bdf = Bdf::new(0, 1, 0).unwrap();
        let mut p = pci.lock();
        // Sizing.
        p.config_write(bdf, 0x10, !0, 0xFFFF_FFFF);
        assert_eq!(p.config_read(bdf, 0x10), 0xFFFF_F000);
        p.config_write(bdf, 0x10, 0xC000_1000, 0xFFFF_FFFF);
        p.config_write(bdf, 0x18, 0xC001_0000, 0xFFFF_FFFF);
        drop(p);
        // Memory decoding off: nothing answers.
        assert_eq!(window.read(0xC000_1000, 4, &cx), 0xFFFF_FFFF);
        pci.lock().config_write(bdf, 0x04, COMMAND_MEMORY as u32, 0xFFFF);
        assert_eq!(window.read(0xC000_1008, 4, &cx), 0x1234);
        assert_eq!(*last.lock(), Some((0, 8, 4, 0)));
        assert_eq!(window.read(0xC000_0FFF, 1, &cx), 0xFF);
        // An access running past the BAR's end is not the BAR's.
        assert_eq!(window.read(0xC000_1FFE, 4, &cx), 0xFFFF_FFFF);
        window.write(0xC001_0010, 8, 77, &cx);
        assert_eq!(*last.lock(), Some((2, 0x10, 8, 77)));
        // Move BAR 0: the old place is dead, the new one decodes.
        pci.lock().config_write(bdf, 0x10, 0xD000_0000, 0xFFFF_FFFF);
        assert_eq!(window.read(0xC000_1000, 4, &cx), 0xFFFF_FFFF);
        assert_eq!(window.read(0xD000_0FFC, 4, &cx), 0x1234);
        // The 64-bit BAR with a non-zero upper half is above the window's addresses.
        pci.lock().config_write(bdf, 0x1C, 1, 0xFFFF_FFFF);
        assert_eq!(pci.lock().mmio_read(0xC001_0000, 4, &cx), None);
        assert_eq!(pci.lock().mmio_read(0x1_C001_0000, 4, &cx), Some(0x1234));
        assert!(pci.lock().mmio_write(0x1_C001_FFF8, 8, 5, &cx));
        assert!(!pci.lock().mmio_write(0x1_C001_FFF9, 8, 5, &cx));
    }

    #[test]
    fn any_port_size_value_is_harmless() {
        let mut pci = PciBus::new();
        let mut space = ConfigSpace::new(1, 2, 3, 4, 5);
        space.set_writable(0xFC, 0xFFFF_FFFF);
        space.set_writable(0xFE, 0xFFFF_FFFF);
        space.set_u32(0xFE, 0x1234_5678);
        pci.add(Bdf::new(0, 1, 0).unwrap(), Box::new(space)).unwrap();
        for port in 0xCF6..0xD02u16 {
            for size in [0, 1, 2, 3, 4, 8] {
                for v in [0u32, 0xFF, 0x8000_0000, 0x8000_08FF, 0x8000_00FF, 0xFFFF_FFFF] {
                    pci.write(0xCF8, 4, v);
                    pci.write(port, size, v);
                    let _ = pci.read(port, size);
                }
            }
        }
        let _ = format!("{pci:?}");
    }
}
