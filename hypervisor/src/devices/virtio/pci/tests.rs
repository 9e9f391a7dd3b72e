//! The transport driven as Linux's virtio_pci_modern drives it, over a fake guest RAM.

use super::*;
use crate::devices::{
    irqchip::no_kick,
    virtio::{
        console::{ConsoleInput, VirtioConsole, INPUT_MAX, RECEIVEQ, TRANSMITQ},
        queue::VIRTQ_DESC_F_NEXT,
        stream::tests::FlatRam,
        STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    },
};
use alloc::{string::ToString, vec::Vec};
use spin::Mutex;

const QSIZE: u16 = 8;
/// Queue q's rings at 0x10000 * (q + 1): descriptors, then available, then used.
fn rings(q: u64) -> (u64, u64, u64) {
    let base = 0x10000 * (q + 1);
    (base, base + 0x1000, base + 0x2000)
}
const DATA: u64 = 0x80000;
const GSI: u8 = 17;

struct Driver {
    dev: VirtioPci,
    /// RAM `[0, 1 MiB)`.
    ram: FlatRam,
    lines: Arc<Mutex<Vec<String>>>,
    irq: Arc<Interrupts>,
    input: Arc<ConsoleInput>,
}

impl Driver {
    fn new() -> Self {
        let irq = Interrupts::new(1, true, 1_000_000_000, no_kick);
        irq.apic(0).lapic.lock().mmio_write(0xF0, 0x1FF, Default::default());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let input = Arc::new(ConsoleInput::new(Some(irq.clone())));
        let console = VirtioConsole::with_sink(Box::new(move |l| sink.lock().push(l.to_string())), input.clone());
        let dev = VirtioPci::new(Box::new(console), "t", irq.clone(), GSI);
        Driver { dev, ram: FlatRam::new(1 << 20), lines, irq, input }
    }
    fn r(&mut self, off: u64, size: u8) -> u64 {
        self.dev.bar_read_mem(off, size, Some(&self.ram))
    }
    fn w(&mut self, off: u64, size: u8, v: u64) {
        self.dev.bar_write_mem(off, size, v, Some(&self.ram))
    }
    fn status(&mut self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }
    /// Linux's order (virtio_dev_probe, vp_modern_find_vqs): reset, ACKNOWLEDGE, DRIVER,
    /// features, FEATURES_OK, queues, DRIVER_OK.
    fn probe(&mut self, features: u64) -> bool {
        self.w(common::DEVICE_STATUS, 1, 0);
        self.w(common::DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE));
        self.w(common::DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        for sel in 0..2 {
            self.w(common::DRIVER_FEATURE_SELECT, 4, sel);
            self.w(common::DRIVER_FEATURE, 4, features >> (32 * sel) & 0xFFFF_FFFF);
        }
        self.w(common::DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
        if self.status() & STATUS_FEATURES_OK == 0 {
            return false;
        }
        let n = self.r(common::NUM_QUEUES, 2);
        for q in 0..n {
            self.w(common::QUEUE_SELECT, 2, q);
            assert_eq!(self.r(common::QUEUE_SIZE, 2), 128);
            assert_eq!(self.r(common::QUEUE_NOTIFY_OFF, 2), q);
            self.w(common::QUEUE_SIZE, 2, u64::from(QSIZE));
            let (d, a, u) = rings(q);
            // A fresh ring (the driver allocates zeroed memory).
            self.ram.put(d, &[0; 0x3000]);
            // 64-bit fields as two 32-bit halves (vp_iowrite64_twopart).
            for (field, v) in [(common::QUEUE_DESC, d), (common::QUEUE_DRIVER, a), (common::QUEUE_DEVICE, u)] {
                self.w(field, 4, v & 0xFFFF_FFFF);
                self.w(field + 4, 4, v >> 32);
            }
            self.w(common::QUEUE_MSIX_VECTOR, 2, q + 1);
        }
        for q in 0..n {
            self.w(common::QUEUE_SELECT, 2, q);
            self.w(common::QUEUE_ENABLE, 2, 1);
        }
        let s = self.status();
        self.w(common::DEVICE_STATUS, 1, u64::from(s | STATUS_DRIVER_OK));
        true
    }
    /// Puts `text` as a two-descriptor chain into the transmit queue and kicks it.
    fn send(&mut self, text: &[u8], slot: u16) {
        let (d, a, _) = rings(u64::from(TRANSMITQ));
        let (first, rest) = text.split_at(text.len() / 2);
        let buf0 = DATA + 0x100 * u64::from(slot);
        self.ram.put(buf0, first);
        self.ram.put(buf0 + 0x80, rest);
        let desc = |addr: u64, len: usize, flags: u16, next: u16| {
            let mut b = Vec::new();
            b.extend_from_slice(&addr.to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&next.to_le_bytes());
            b
        };
        let i0 = (2 * slot) % QSIZE;
        self.ram.put(d + 16 * u64::from(i0), &desc(buf0, first.len(), VIRTQ_DESC_F_NEXT, i0 + 1));
        self.ram.put(d + 16 * u64::from(i0 + 1), &desc(buf0 + 0x80, rest.len(), 0, 0));
        let idx = self.ram.u16_at(a + 2);
        self.ram.put(a + 4 + 2 * u64::from(idx % QSIZE), &i0.to_le_bytes());
        self.ram.put(a + 2, &idx.wrapping_add(1).to_le_bytes());
        self.w(NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * u64::from(TRANSMITQ), 2, u64::from(TRANSMITQ));
    }
    /// Posts a `len`-byte device-writable buffer on the receiveq (descriptor `slot`) and kicks.
    fn post_rx(&mut self, slot: u16, len: u32) {
        let (d, a, _) = rings(u64::from(RECEIVEQ));
        let addr = DATA + 0x8000 + 0x100 * u64::from(slot);
        let mut desc = Vec::new();
        desc.extend_from_slice(&addr.to_le_bytes());
        desc.extend_from_slice(&len.to_le_bytes());
        desc.extend_from_slice(&crate::devices::virtio::queue::VIRTQ_DESC_F_WRITE.to_le_bytes());
        desc.extend_from_slice(&0u16.to_le_bytes());
        self.ram.put(d + 16 * u64::from(slot), &desc);
        let idx = self.ram.u16_at(a + 2);
        self.ram.put(a + 4 + 2 * u64::from(idx % QSIZE), &slot.to_le_bytes());
        self.ram.put(a + 2, &idx.wrapping_add(1).to_le_bytes());
        self.w(NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * u64::from(RECEIVEQ), 2, u64::from(RECEIVEQ));
    }
    /// The receiveq's used entries from `from` on: (descriptor, bytes) and the bytes.
    fn rx_used(&self, from: u16) -> Vec<(u32, Vec<u8>)> {
        let (_, _, u) = rings(u64::from(RECEIVEQ));
        let idx = self.ram.u16_at(u + 2);
        (from..idx)
            .map(|i| {
                let e = u + 4 + 8 * u64::from(i % QSIZE);
                let id = self.ram.u16_at(e);
                let len = u32::from(self.ram.u16_at(e + 4));
                let mut b = alloc::vec![0u8; len as usize];
                self.ram.read(DATA + 0x8000 + 0x100 * u64::from(id), &mut b).unwrap();
                (u32::from(id), b)
            })
            .collect()
    }
    fn used_idx(&self) -> u16 {
        self.ram.u16_at(rings(u64::from(TRANSMITQ)).2 + 2)
    }
    fn irr_has(&self, vector: u8) -> bool {
        let reg = self.irq.apic(0).lapic.lock().mmio_read(0x200 + 0x10 * u32::from(vector / 32), Default::default());
        reg & (1 << (vector % 32)) != 0
    }
}

#[test]
fn identity_and_capabilities() {
    let mut d = Driver::new();
    let f = &mut d.dev;
    assert_eq!(f.config_read(0), 0x1043_1AF4, "virtio-console, modern");
    assert_eq!(f.config_read(8), 0x0780_0001, "class 0x078000, revision 1");
    assert_eq!(f.config_read(0x2C), 0x1100_1AF4);
    assert_eq!(f.config_read(0x3C) >> 8 & 0xFF, 1, "INTA");
    assert_eq!(f.config_read(4) >> 16 & u32::from(STATUS_CAPABILITIES), u32::from(STATUS_CAPABILITIES));
    // BAR sizing.
    f.config_write(0x10, !0, !0);
    assert_eq!(f.config_read(0x10), !(BAR_SIZE as u32 - 1));
    // Walk the capability list as Linux's pci_find_capability / virtio_pci_find_capability.
    let mut at = f.config_read(0x34) as u8;
    let mut found = Vec::new();
    while at != 0 {
        let head = f.config_read(at);
        let id = head as u8;
        if id == CAP_ID_VENDOR {
            let cfg_type = (head >> 24) as u8;
            let bar = f.config_read(at + 4) as u8;
            let offset = f.config_read(at + 8);
            let length = f.config_read(at + 12);
            assert_eq!(bar, 0);
            assert!(u64::from(offset) + u64::from(length) <= BAR_SIZE, "{cfg_type}");
            found.push((cfg_type, offset, length));
            if cfg_type == CFG_NOTIFY {
                assert_eq!(f.config_read(at + 16), NOTIFY_MULTIPLIER);
            }
        } else {
            assert_eq!(id, crate::devices::msix::CAP_ID_MSIX);
            assert_eq!(head >> 16 & 0x7FF, 2, "3 vectors: config + 2 queues");
            assert_eq!(f.config_read(at + 4), MSIX_TABLE_OFFSET as u32);
            assert_eq!(f.config_read(at + 8), MSIX_PBA_OFFSET as u32);
        }
        at = (head >> 8) as u8;
    }
    assert_eq!(found, [(1, 0, common::LEN as u32), (2, 0x3000, 8), (3, 0x1000, 4), (4, 0x2000, 12), (5, 0, 0)]);
}

#[test]
fn features_must_include_version_1() {
    let mut d = Driver::new();
    d.w(common::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(d.r(common::DEVICE_FEATURE, 4), 1, "VERSION_1");
    d.w(common::DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(d.r(common::DEVICE_FEATURE, 4), 3 << 28, "INDIRECT_DESC, EVENT_IDX");
    d.w(common::DEVICE_FEATURE_SELECT, 4, 7);
    assert_eq!(d.r(common::DEVICE_FEATURE, 4), 0);
    assert!(!d.probe(0), "legacy driver refused");
    assert!(!d.probe(1 << 32 | 1 << 5), "a feature not offered");
    assert!(d.probe(1 << 32));
    assert_eq!(d.dev.driver_features(), 1 << 32);
}

#[test]
fn output_with_intx_then_msix() {
    let mut d = Driver::new();
    assert!(d.probe(1 << 32 | 1 << 28));
    assert_eq!(d.status(), 0x0F);
    // MSI-X disabled: INTA and ISR bit 0.
    d.dev.config_write(OFFSET_COMMAND, u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER), 0xFFFF);
    d.send(b"hello virtio\nhalf", 0);
    assert_eq!(*d.lines.lock(), ["hello virtio"]);
    assert_eq!(d.used_idx(), 1);
    assert!(d.dev.config_read(4) >> 16 & u32::from(STATUS_INTERRUPT) != 0);
    assert_eq!(d.r(ISR_OFFSET, 1), u64::from(ISR_QUEUE));
    assert_eq!(d.r(ISR_OFFSET, 1), 0, "read to clear");
    assert_eq!(d.dev.config_read(4) >> 16 & u32::from(STATUS_INTERRUPT), 0);
    // MSI-X: vector 2 (queue 1) -> APIC 0, vector 0x45.
    d.dev.config_write(CAP_MSIX, u32::from(crate::devices::msix::CONTROL_ENABLE) << 16, 0xFFFF_0000);
    d.w(MSIX_TABLE_OFFSET + 2 * 16, 4, 0xFEE0_0000);
    d.w(MSIX_TABLE_OFFSET + 2 * 16 + 8, 4, 0x45);
    d.w(MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 0);
    d.w(common::QUEUE_SELECT, 2, 1);
    assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, 2), 2);
    d.send(b" line\n", 1);
    assert_eq!(*d.lines.lock(), ["hello virtio", "half line"]);
    assert!(d.irr_has(0x45));
    assert_eq!(d.r(ISR_OFFSET, 1), 0, "no ISR with MSI-X");
    // A vector outside the table reads back as NO_VECTOR (Linux then falls back).
    d.w(common::QUEUE_MSIX_VECTOR, 2, 3);
    assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(d.dev.errors, 0);
}

#[test]
fn a_broken_chain_needs_reset_and_the_vm_goes_on() {
    let mut d = Driver::new();
    assert!(d.probe(1 << 32));
    d.dev.config_write(CAP_MSIX, u32::from(crate::devices::msix::CONTROL_ENABLE) << 16, 0xFFFF_0000);
    d.w(common::CONFIG_MSIX_VECTOR, 2, 0);
    d.w(MSIX_TABLE_OFFSET, 4, 0xFEE0_0000);
    d.w(MSIX_TABLE_OFFSET + 8, 4, 0x51);
    d.w(MSIX_TABLE_OFFSET + 12, 4, 0);
    // A chain that loops: descriptor 0 -> 1 -> 0.
    let (desc, avail, _) = rings(u64::from(TRANSMITQ));
    for (i, next) in [(0u64, 1u16), (1, 0)] {
        let mut b = Vec::new();
        b.extend_from_slice(&DATA.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&VIRTQ_DESC_F_NEXT.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        d.ram.put(desc + 16 * i, &b);
    }
    d.ram.put(avail + 4, &0u16.to_le_bytes());
    d.ram.put(avail + 2, &1u16.to_le_bytes());
    d.w(NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
    assert!(d.irr_has(0x51), "configuration change notification");
    assert_eq!(d.r(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
    assert_eq!(d.dev.errors, 1);
    // Ignored until reset, then usable again.
    d.send(b"lost\n", 1);
    assert!(d.lines.lock().is_empty());
    assert!(d.probe(1 << 32));
    assert_eq!(d.status(), 0x0F);
    d.send(b"again\n", 0);
    assert_eq!(*d.lines.lock(), ["again"]);
}

#[test]
fn bad_queue_setup_needs_reset() {
    let mut d = Driver::new();
    d.w(common::DEVICE_STATUS, 1, 0x0B);
    d.w(common::DRIVER_FEATURE_SELECT, 4, 1);
    d.w(common::DRIVER_FEATURE, 4, 1);
    d.w(common::DEVICE_STATUS, 1, 0x0B);
    d.w(common::QUEUE_SELECT, 2, 1);
    d.w(common::QUEUE_SIZE, 2, 6); // not a power of two
    d.w(common::QUEUE_ENABLE, 2, 1);
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
    // Ring above RAM.
    d.w(common::DEVICE_STATUS, 1, 0);
    assert_eq!(d.status(), 0);
    d.w(common::DEVICE_STATUS, 1, 0x0B);
    d.w(common::DRIVER_FEATURE_SELECT, 4, 1);
    d.w(common::DRIVER_FEATURE, 4, 1);
    d.w(common::DEVICE_STATUS, 1, 0x0B);
    d.w(common::QUEUE_DESC, 8, 0xFFFF_FFFF_FFFF_F000);
    d.w(common::QUEUE_ENABLE, 2, 1);
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
}

#[test]
fn the_config_access_window_reaches_the_bar() {
    let mut d = Driver::new();
    let data = CAP_PCI_CFG + 16;
    d.dev.config_write(CAP_PCI_CFG + 12, 4, !0);
    d.dev.config_write(CAP_PCI_CFG + 8, common::NUM_QUEUES as u32 & !3, !0);
    assert_eq!(d.dev.config_read(data), 0x0002_FFFF, "config_msix_vector NO_VECTOR, num_queues 2");
    d.dev.config_write(CAP_PCI_CFG + 12, 2, !0);
    d.dev.config_write(CAP_PCI_CFG + 8, common::NUM_QUEUES as u32, !0);
    assert_eq!(d.dev.config_read(data), 2);
    d.dev.config_write(CAP_PCI_CFG + 12, 3, !0);
    assert_eq!(d.dev.config_read(data), 0, "length 3 is not an access");
}

#[test]
fn hostile_registers_are_harmless() {
    let mut d = Driver::new();
    let mut x = 0x1234_5678_9ABC_DEF0u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = match x % 4 {
            0 => x >> 8 & 0x3F,
            1 => NOTIFY_OFFSET + (x >> 8 & 0xF),
            2 => MSIX_TABLE_OFFSET + (x >> 8 & 0x3F),
            _ => x >> 8 & 0x7FFF,
        };
        let size = [1u8, 2, 4, 8, 3, 0][(x >> 40) as usize % 6];
        if x >> 50 & 1 == 0 {
            d.w(off, size, x.rotate_left(17));
        } else {
            let _ = d.r(off, size);
        }
        if x.is_multiple_of(89) {
            // Offsets no BAR routing would pass: the transport still answers calmly.
            d.w(u64::MAX - (x & 7), size, x);
            let _ = d.r(u64::MAX - (x & 7), size);
        }
        if x.is_multiple_of(97) {
            d.dev.config_write((x >> 20) as u8, x as u32, (x >> 32) as u32);
            let _ = d.dev.config_read((x >> 28) as u8);
        }
    }
}

#[test]
fn typed_bytes_reach_the_receive_queue() {
    let mut d = Driver::new();
    assert!(!d.input.is_open(), "input goes to the UART until the driver is up");
    assert!(d.probe(1 << 32));
    assert!(d.input.is_open());
    d.dev.config_write(OFFSET_COMMAND, u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER), 0xFFFF);
    // Linux posts its receive buffers at probe; nothing is typed yet.
    d.post_rx(0, 4);
    d.post_rx(1, 64);
    assert!(d.rx_used(0).is_empty());
    // Typed bytes wake the VM; its next device tick fills the buffers in order, a 4-byte
    // buffer first, and raises the queue's interrupt (INTx here: ISR bit 0).
    assert_eq!(d.input.push(b"ls -l\n"), 6);
    assert!(d.irq.take_device_wake());
    assert_eq!(d.dev.dev.pending_queues(), 1 << RECEIVEQ);
    d.dev.run_pending(&d.ram);
    assert_eq!(d.dev.dev.pending_queues(), 0);
    let got = d.rx_used(0);
    assert_eq!(got, [(0, b"ls -".to_vec()), (1, b"l\n".to_vec())]);
    assert_eq!(d.r(ISR_OFFSET, 1), u64::from(ISR_QUEUE));
    // No buffer left: bytes wait (bounded), and come with the driver's next buffer.
    assert_eq!(d.input.push(b"pwd\n"), 4);
    d.dev.run_pending(&d.ram);
    assert_eq!(d.rx_used(2).len(), 0);
    assert_eq!(d.input.push(&alloc::vec![b'x'; INPUT_MAX]), INPUT_MAX - 4, "bounded");
    assert_eq!(d.input.space(), 0);
    d.post_rx(2, 64);
    assert_eq!(d.rx_used(2), [(2, b"pwd\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".to_vec())]);
    // A reset closes the input and drops what waited.
    d.w(common::DEVICE_STATUS, 1, 0);
    assert!(!d.input.is_open());
    assert_eq!(d.input.space(), INPUT_MAX);
    assert_eq!(d.dev.errors, 0);
}
