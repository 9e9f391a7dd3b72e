//! QEMU's firmware configuration device (`fw_cfg`) over I/O ports, as QEMU's
//! docs/specs/fw_cfg.rst describes it for x86: a 16-bit selector register at port 0x510 and
//! an 8-bit data register at 0x511. Writing a key to the selector resets the data offset;
//! each data read returns the item's next byte, 0 past its end or for an unknown key. No DMA
//! interface (FW_CFG_ID bit 1 clear) and no write channel.
//!
//! Items: the signature "QEMU", ID (traditional interface), a zero UUID, RAM size, CPU
//! counts, the kernel command line (size with its NUL, then the string), and the file
//! directory (big-endian count and 64-byte entries; one file, `opt/vireo/vm-name`).

use alloc::{string::String, vec::Vec};

use super::bus::{BusEffect, Ctx, Device, Range};

pub const FW_CFG_PORT: u16 = 0x510;

/// Selector keys (Linux include/uapi/linux/qemu_fw_cfg.h).
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0F;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    pub const FILE_DIR: u16 = 0x19;
    pub const FILE_FIRST: u16 = 0x20;
    /// Bits that are not part of the key: the write channel and the arch-local flag.
    pub const ENTRY_MASK: u16 = 0x3FFF;
    pub const ARCH_LOCAL: u16 = 0x8000;
}

/// FW_CFG_ID: the traditional (port) interface only.
pub const ID_TRADITIONAL: u32 = 1 << 0;

/// One entry of the file directory, as the guest reads it (every field big-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u32,
    pub select: u16,
    pub reserved: u16,
    pub name: [u8; 56],
}
const _: () = assert!(core::mem::size_of::<FileEntry>() == 64);

impl FileEntry {
    fn to_bytes(self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&self.size.to_be_bytes());
        b[4..6].copy_from_slice(&self.select.to_be_bytes());
        b[6..8].copy_from_slice(&self.reserved.to_be_bytes());
        b[8..].copy_from_slice(&self.name);
        b
    }
}

pub struct FwCfg {
    /// (key, contents) of every item.
    items: Vec<(u16, Vec<u8>)>,
    /// The selected item (an index into `items`), if its key exists.
    selected: Option<usize>,
    offset: usize,
}

impl FwCfg {
    pub const RANGES: [Range; 1] = [Range::port(FW_CFG_PORT, 2)];

    /// The items of a VM with `ram` bytes, `cpus` vCPUs, kernel command line `cmdline`, named `name`.
    pub fn new(ram: u64, cpus: u16, cmdline: &str, name: &str) -> Self {
        let mut cmd = Vec::from(cmdline.as_bytes());
        cmd.push(0);
        let files: [(&str, Vec<u8>); 1] = [("opt/vireo/vm-name", Vec::from(name.as_bytes()))];
        let mut items: Vec<(u16, Vec<u8>)> = alloc::vec![
            (key::SIGNATURE, Vec::from(&b"QEMU"[..])),
            (key::ID, Vec::from(&ID_TRADITIONAL.to_le_bytes()[..])),
            (key::UUID, alloc::vec![0; 16]),
            (key::RAM_SIZE, Vec::from(&ram.to_le_bytes()[..])),
            (key::NOGRAPHIC, Vec::from(&1u16.to_le_bytes()[..])),
            (key::NB_CPUS, Vec::from(&cpus.to_le_bytes()[..])),
            (key::MAX_CPUS, Vec::from(&cpus.to_le_bytes()[..])),
            (key::CMDLINE_SIZE, Vec::from(&(cmd.len() as u32).to_le_bytes()[..])),
            (key::CMDLINE_DATA, cmd),
        ];
        let mut dir = Vec::from(&(files.len() as u32).to_be_bytes()[..]);
        for (i, (fname, data)) in files.into_iter().enumerate() {
            let mut n = [0u8; 56];
            let len = fname.len().min(55);
            n[..len].copy_from_slice(&fname.as_bytes()[..len]);
            let select = key::FILE_FIRST + i as u16;
            dir.extend_from_slice(&FileEntry { size: data.len() as u32, select, reserved: 0, name: n }.to_bytes());
            items.push((select, data));
        }
        items.push((key::FILE_DIR, dir));
        Self { items, selected: None, offset: 0 }
    }

    /// The kernel command line this device hands out (for reports and tests).
    pub fn cmdline(&self) -> String {
        let data = self.item(key::CMDLINE_DATA).unwrap_or(&[]);
        String::from_utf8_lossy(data.strip_suffix(&[0]).unwrap_or(data)).into_owned()
    }

    fn item(&self, k: u16) -> Option<&[u8]> {
        self.items.iter().find(|(key, _)| *key == k).map(|(_, d)| d.as_slice())
    }

    fn select(&mut self, value: u16) {
        let k = value & key::ENTRY_MASK;
        // Arch-local keys (x86: ACPI tables, e820, ...) are not offered.
        self.selected =
            if value & key::ARCH_LOCAL != 0 { None } else { self.items.iter().position(|(key, _)| *key == k) };
        self.offset = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let Some(i) = self.selected else { return 0 };
        let b = self.items[i].1.get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }
}

impl Device for FwCfg {
    fn name(&self) -> &'static str {
        "fw_cfg"
    }

    fn read(&mut self, addr: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
        if addr != FW_CFG_PORT as u64 + 1 {
            return 0;
        }
        // A wider read returns that many successive bytes, the first one most significant
        // (as QEMU's data register combines them).
        (0..size.min(8)).fold(0u64, |v, _| (v << 8) | self.next_byte() as u64)
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, _cx: &Ctx<'_>) -> BusEffect {
        if addr == FW_CFG_PORT as u64 && size == 2 {
            self.select(value as u16);
        }
        // Data writes (the write channel is gone since QEMU 2.4) are ignored.
        BusEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        devices::{
            bus::{device, Bus, Space},
            time::Nanos,
        },
        mm::FrameAllocator,
        vmm::guest_mem::GuestMemory,
    };

    fn read_item(bus: &Bus, cx: &Ctx<'_>, k: u16, len: usize) -> Vec<u8> {
        bus.write(Space::Port, 0x510, 2, k as u64, cx).unwrap();
        (0..len).map(|_| bus.read(Space::Port, 0x511, 1, cx).unwrap() as u8).collect()
    }

    #[test]
    fn items_as_qemu_hands_them_out() {
        let mut bus = Bus::new();
        bus.add(device(FwCfg::new(64 << 20, 2, "a b=c", "mb")), &FwCfg::RANGES).unwrap();
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        assert_eq!(read_item(&bus, &cx, key::SIGNATURE, 5), b"QEMU\0", "0 past the end");
        assert_eq!(read_item(&bus, &cx, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&bus, &cx, key::RAM_SIZE, 8), (64u64 << 20).to_le_bytes());
        assert_eq!(read_item(&bus, &cx, key::NB_CPUS, 2), [2, 0]);
        assert_eq!(read_item(&bus, &cx, key::CMDLINE_SIZE, 4), [6, 0, 0, 0]);
        assert_eq!(read_item(&bus, &cx, key::CMDLINE_DATA, 6), b"a b=c\0");
        // Re-selecting starts over; an unknown or arch-local key reads zeros.
        assert_eq!(read_item(&bus, &cx, key::SIGNATURE, 2), b"QE");
        assert_eq!(read_item(&bus, &cx, 0x1234, 3), [0, 0, 0]);
        assert_eq!(read_item(&bus, &cx, 0x8000, 3), [0, 0, 0]);
        // The file directory: big-endian count, then 64-byte entries.
        let dir = read_item(&bus, &cx, key::FILE_DIR, 4 + 64);
        assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_be_bytes(dir[4..8].try_into().unwrap()), 2, "size of the name");
        assert_eq!(u16::from_be_bytes(dir[8..10].try_into().unwrap()), key::FILE_FIRST);
        assert!(dir[12..].starts_with(b"opt/vireo/vm-name\0"));
        assert_eq!(read_item(&bus, &cx, key::FILE_FIRST, 2), b"mb");
        // A 4-byte read: four successive bytes, the first most significant.
        bus.write(Space::Port, 0x510, 2, key::SIGNATURE as u64, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0x511, 4, &cx), Some(u32::from_be_bytes(*b"QEMU") as u64));
        // A byte write to the selector port is not a selection.
        bus.write(Space::Port, 0x510, 1, key::ID as u64, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0x511, 1, &cx), Some(0));
    }

    #[test]
    fn cmdline_accessor() {
        assert_eq!(FwCfg::new(1, 1, "x y", "n").cmdline(), "x y");
        assert_eq!(FwCfg::new(1, 1, "", "n").cmdline(), "");
    }
}
