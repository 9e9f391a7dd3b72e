//! The virtio PCI transport, modern interface only (virtio 1.2 §4.1): one PCI function per
//! [`VirtioDevice`], its structures in one 32-bit memory BAR that the guest places.
//!
//! Identity (§4.1.2): vendor 0x1AF4, device 0x1040 + device type, revision 1 (no legacy
//! interface), subsystem vendor 0x1AF4 and subsystem 0x1100 (QEMU's choice for modern-only
//! devices; §4.1.2 leaves it free), interrupt pin INTA.
//!
//! Capabilities (§4.1.4), at [`CAP_MSIX`] and following: MSI-X (PCI 3.0 §6.8.2, [`Msix`]),
//! then vendor-specific ones (ID 0x09, [`VirtioPciCap`]) for the common configuration (type 1),
//! notifications (2, [`VirtioPciNotifyCap`], multiplier [`NOTIFY_MULTIPLIER`], queue `q`'s
//! notify_off is `q`), the ISR status (3), the device configuration (4) and the PCI
//! configuration access window (5, [`VirtioPciCfgCap`]).
//!
//! BAR 0 layout ([`BAR_SIZE`] bytes, each structure in its own 4 KiB page):
//!
//! | offset   | what                                                   |
//! |----------|--------------------------------------------------------|
//! | 0x0000   | common configuration (§4.1.4.3, [`common`])            |
//! | 0x1000   | ISR status (§4.1.4.5): read clears                     |
//! | 0x2000   | device configuration (the device's)                    |
//! | 0x3000   | notifications: 4 bytes per queue (§4.1.4.4)            |
//! | 0x4000   | MSI-X table                                            |
//! | 0x5000   | MSI-X PBA                                              |
//!
//! Features: the device's, plus VERSION_1, RING_INDIRECT_DESC and RING_EVENT_IDX. The driver
//! must accept VERSION_1 and nothing not offered, or FEATURES_OK does not stick (§2.2.2,
//! §3.1.1). A queue is validated ([`SplitQueue::new`]) when the driver enables it; a notify
//! write runs the device's work for that queue at once, and a used-buffer notification goes
//! out through the queue's MSI-X vector, or with MSI-X disabled through ISR bit 0 and INTA
//! (level: held until the driver reads the ISR, §4.1.4.5.1).
//!
//! A driver error (a [`QueueError`]: a bad ring, a broken chain) sets DEVICE_NEEDS_RESET, logs
//! one line, and if DRIVER_OK is set sends a configuration change notification (§2.1.2); the
//! device then ignores its queues until reset. Nothing the guest writes (register values,
//! sizes, addresses, MSI-X entries) can make Vireo panic.
//!
//! The PCI configuration access window (type 5) reaches the BAR without a guest memory
//! context; a queue enable or a notify made through it takes effect at the next BAR access
//! (Linux does not use the window).

use alloc::{boxed::Box, string::String, sync::Arc, vec::Vec};

use super::{
    queue::{GuestRam, QueueConfig, QueueError, QueueFeatures, SplitQueue, MAX_QUEUE_SIZE},
    DeviceStatus, Queues, VirtioDevice, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::devices::{
    bus::Ctx,
    irqchip::{Interrupts, IntxLine},
    msix::{read_bytes, Msix, CONTROL_WRITABLE},
    pci::{
        ConfigSpace, PciFunction, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY, OFFSET_BAR0,
        OFFSET_CAPABILITIES, OFFSET_COMMAND, OFFSET_INTERRUPT_LINE, OFFSET_INTERRUPT_PIN, OFFSET_STATUS,
        OFFSET_SUBSYSTEM, OFFSET_SUBSYSTEM_VENDOR, STATUS_CAPABILITIES, STATUS_INTERRUPT,
    },
};

pub const VENDOR: u16 = 0x1AF4;
/// Device ID = 0x1040 + device type (§4.1.2.1).
pub const DEVICE_ID_BASE: u16 = 0x1040;
pub const REVISION: u8 = 1;
pub const SUBSYSTEM: u16 = 0x1100;

/// Vendor-specific capability ID (PCI 3.0 Appendix H).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// cfg_type values (§4.1.4).
pub const CFG_COMMON: u8 = 1;
pub const CFG_NOTIFY: u8 = 2;
pub const CFG_ISR: u8 = 3;
pub const CFG_DEVICE: u8 = 4;
pub const CFG_PCI: u8 = 5;

/// `struct virtio_pci_cap` (§4.1.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciCap {
    pub cap_vndr: u8,
    pub cap_next: u8,
    pub cap_len: u8,
    pub cfg_type: u8,
    pub bar: u8,
    pub id: u8,
    pub padding: [u8; 2],
    pub offset: u32,
    pub length: u32,
}

/// `struct virtio_pci_notify_cap` (§4.1.4.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciNotifyCap {
    pub cap: VirtioPciCap,
    pub notify_off_multiplier: u32,
}

/// `struct virtio_pci_cfg_cap` (§4.1.4.9).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciCfgCap {
    pub cap: VirtioPciCap,
    pub pci_cfg_data: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<VirtioPciCap>() == 16);
const _: () = assert!(core::mem::size_of::<VirtioPciNotifyCap>() == 20);
const _: () = assert!(core::mem::size_of::<VirtioPciCfgCap>() == 20);

impl VirtioPciCap {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&[self.cap_vndr, self.cap_next, self.cap_len, self.cfg_type, self.bar, self.id]);
        b[8..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }
}

/// `struct virtio_pci_common_cfg` field offsets (§4.1.4.3), all little-endian.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0C;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
    pub const QUEUE_ENABLE: u64 = 0x1C;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    pub const QUEUE_RESET: u64 = 0x3A;
    /// The structure's length (virtio 1.2, with queue_notify_data and queue_reset).
    pub const LEN: u64 = 0x3C;
}

/// "No vector" for config_msix_vector and queue_msix_vector (§4.1.4.3).
pub const NO_VECTOR: u16 = 0xFFFF;

pub const BAR: u8 = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const ISR_LEN: u64 = 4;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const DEVICE_MAX_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// At most this many queues (their notify addresses fit the notify page; MSI-X vectors:
/// one per queue and one for configuration changes).
pub const MAX_QUEUES: usize = 64;

/// ISR status bits (§4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// Configuration space offsets of the capabilities.
pub const CAP_MSIX: u8 = 0x40;
pub const CAP_COMMON: u8 = 0x50;
pub const CAP_NOTIFY: u8 = 0x60;
pub const CAP_ISR: u8 = 0x74;
pub const CAP_DEVICE: u8 = 0x84;
pub const CAP_PCI_CFG: u8 = 0x94;
/// The window's pci_cfg_data dword.
const PCI_CFG_DATA: u8 = CAP_PCI_CFG + 16;

/// One queue's registers as the driver set them.
#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    max: u16,
    size: u16,
    msix_vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs { max, size: max, msix_vector: NO_VECTOR, enabled: false, desc: 0, driver: 0, device: 0 }
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    dev: Box<dyn VirtioDevice>,
    vm: String,
    space: ConfigSpace,
    msix: Msix,
    intx: IntxLine,
    isr: u8,
    status: DeviceStatus,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    config_generation: u8,
    queue_select: u16,
    regs: Vec<QueueRegs>,
    queues: Vec<Option<SplitQueue>>,
    /// Queues enabled or notified through the configuration access window, waiting for a
    /// guest memory context (bit q).
    deferred: u64,
    /// Notifications handled, used-buffer and configuration interrupts sent, driver errors.
    pub notifications: u64,
    pub interrupts: u64,
    pub errors: u64,
}

impl VirtioPci {
    /// `dev` for VM `vm`, its INTA wired to I/O APIC pin `intx_gsi`.
    pub fn new(dev: Box<dyn VirtioDevice>, vm: &str, irq: Arc<Interrupts>, intx_gsi: u8) -> Self {
        let maxes: Vec<u16> =
            dev.queue_max_sizes().iter().take(MAX_QUEUES).map(|&m| m.clamp(1, MAX_QUEUE_SIZE)).collect();
        let nq = maxes.len();
        let msix = Msix::new(nq as u16 + 1, irq.clone());
        let mut space =
            ConfigSpace::new(VENDOR, DEVICE_ID_BASE.wrapping_add(dev.device_type()), dev.pci_class(), REVISION, 0);
        space.set_u16(OFFSET_STATUS, STATUS_CAPABILITIES);
        space.set_writable(OFFSET_COMMAND, u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE));
        // BAR 0: 32-bit memory, not prefetchable (bits 3:0 = 0), sized by its write mask.
        space.set_writable(OFFSET_BAR0, !(BAR_SIZE as u32 - 1));
        space.set_u16(OFFSET_SUBSYSTEM_VENDOR, VENDOR);
        space.set_u16(OFFSET_SUBSYSTEM, SUBSYSTEM);
        space.set_u8(OFFSET_CAPABILITIES, CAP_MSIX);
        space.set_writable(OFFSET_INTERRUPT_LINE, 0xFF);
        space.set_u8(OFFSET_INTERRUPT_PIN, 1);
        let cap = msix.capability(CAP_COMMON, BAR, MSIX_TABLE_OFFSET as u32, BAR, MSIX_PBA_OFFSET as u32);
        space.set_slice(CAP_MSIX, &cap.to_bytes());
        space.set_writable(CAP_MSIX, u32::from(CONTROL_WRITABLE) << 16);
        let vcap = |next: u8, len: u8, cfg_type: u8, offset: u64, length: u64| VirtioPciCap {
            cap_vndr: CAP_ID_VENDOR,
            cap_next: next,
            cap_len: len,
            cfg_type,
            bar: BAR,
            id: 0,
            padding: [0; 2],
            offset: offset as u32,
            length: length as u32,
        };
        space.set_slice(CAP_COMMON, &vcap(CAP_NOTIFY, 16, CFG_COMMON, COMMON_OFFSET, common::LEN).to_bytes());
        let notify = vcap(CAP_ISR, 20, CFG_NOTIFY, NOTIFY_OFFSET, u64::from(NOTIFY_MULTIPLIER) * nq.max(1) as u64);
        space.set_slice(CAP_NOTIFY, &notify.to_bytes());
        space.set_u32(CAP_NOTIFY + 16, NOTIFY_MULTIPLIER);
        space.set_slice(CAP_ISR, &vcap(CAP_DEVICE, 16, CFG_ISR, ISR_OFFSET, ISR_LEN).to_bytes());
        let dev_len = dev.config_len().clamp(1, DEVICE_MAX_LEN);
        space.set_slice(CAP_DEVICE, &vcap(CAP_PCI_CFG, 16, CFG_DEVICE, DEVICE_OFFSET, dev_len).to_bytes());
        space.set_slice(CAP_PCI_CFG, &vcap(0, 20, CFG_PCI, 0, 0).to_bytes());
        // The window's bar, offset and length are the driver's (§4.1.4.9).
        space.set_writable(CAP_PCI_CFG + 4, 0xFF);
        space.set_writable(CAP_PCI_CFG + 8, !0);
        space.set_writable(CAP_PCI_CFG + 12, !0);
        VirtioPci {
            dev,
            vm: String::from(vm),
            space,
            msix,
            intx: IntxLine::new(irq, intx_gsi),
            isr: 0,
            status: DeviceStatus::default(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            config_generation: 0,
            queue_select: 0,
            regs: maxes.iter().map(|&m| QueueRegs::new(m)).collect(),
            queues: alloc::vec![None; nq],
            deferred: 0,
            notifications: 0,
            interrupts: 0,
            errors: 0,
        }
    }

    /// The features offered.
    pub fn offered(&self) -> u64 {
        (self.dev.features() & 0xFF_FFFF) | 1 << F_VERSION_1 | 1 << F_INDIRECT_DESC | 1 << F_EVENT_IDX
    }

    pub fn status(&self) -> u8 {
        self.status.0
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the queues may be used: features accepted, no error since the last reset.
    fn usable(&self) -> bool {
        self.status.0 & STATUS_FEATURES_OK != 0 && !self.status.needs_reset()
    }

    // --- interrupts -----------------------------------------------------------------------

    fn update_intx(&mut self) {
        let pending = self.isr != 0 && !self.msix.enabled();
        let command = self.space.get_u16(OFFSET_COMMAND);
        let status = self.space.get_u16(OFFSET_STATUS) & !STATUS_INTERRUPT;
        self.space.set_u16(OFFSET_STATUS, status | if pending { STATUS_INTERRUPT } else { 0 });
        self.intx.set(pending && command & COMMAND_INTX_DISABLE == 0);
    }

    /// A used-buffer notification for queue `q` (§4.1.5.2).
    fn signal_queue(&mut self, q: usize) {
        self.interrupts += 1;
        if self.msix.enabled() {
            let vector = self.regs[q].msix_vector;
            if vector != NO_VECTOR {
                self.msix.signal(vector);
            }
        } else {
            self.isr |= ISR_QUEUE;
            self.update_intx();
        }
    }

    /// A configuration change notification (§4.1.5.3).
    fn signal_config(&mut self) {
        self.interrupts += 1;
        self.isr |= ISR_CONFIG;
        if self.msix.enabled() {
            if self.config_msix_vector != NO_VECTOR {
                self.msix.signal(self.config_msix_vector);
            }
        } else {
            self.update_intx();
        }
    }

    /// The driver broke the rules on queue `q`: DEVICE_NEEDS_RESET (§2.1.2).
    fn fail(&mut self, q: usize, e: QueueError) {
        self.errors += 1;
        if self.status.set_needs_reset() {
            log::warn!(
                "vm {}: virtio-{} queue {q}: {e}: device needs reset (status {:#x})",
                self.vm,
                self.dev.name(),
                self.status.0
            );
            if self.status.0 & STATUS_DRIVER_OK != 0 {
                self.signal_config();
            }
        }
    }

    // --- queues ---------------------------------------------------------------------------

    /// Builds queue `q` from its registers if it is enabled and not built yet.
    fn build_queue(&mut self, q: usize, mem: &dyn GuestRam) {
        let r = self.regs[q];
        if !r.enabled || self.queues[q].is_some() || self.status.needs_reset() {
            return;
        }
        let config = QueueConfig { size: r.size, desc: r.desc, avail: r.driver, used: r.device };
        let result = if r.size > r.max {
            Err(QueueError::BadSize(r.size))
        } else {
            SplitQueue::new(config, QueueFeatures::from_bits(self.driver_features), &mem)
        };
        match result {
            Ok(queue) => self.queues[q] = Some(queue),
            Err(e) => self.fail(q, e),
        }
    }

    /// The driver notified queue `q` (or the transport looks at it): the device's work, then
    /// used-buffer notifications where the driver wants them.
    fn notify(&mut self, q: usize, mem: &dyn GuestRam) {
        if q >= self.queues.len() || !self.usable() {
            return;
        }
        self.build_queue(q, mem);
        if self.queues[q].is_none() {
            return;
        }
        self.notifications += 1;
        let mut queues = Queues::new(&mut self.queues, mem);
        let result = self.dev.notify(q as u16, &mut queues);
        let used = queues.used();
        if let Err(e) = result {
            self.fail(q, e);
            return;
        }
        for i in 0..self.queues.len().min(64) {
            if used & (1 << i) == 0 {
                continue;
            }
            let wanted = match self.queues[i].as_mut() {
                Some(queue) => queue.needs_notification(&mem),
                None => Ok(false),
            };
            match wanted {
                Ok(true) => self.signal_queue(i),
                Ok(false) => {}
                Err(e) => {
                    self.fail(i, e);
                    return;
                }
            }
        }
    }

    /// Runs the queues with work from outside the VM ([`VirtioDevice::pending_queues`]).
    fn run_pending(&mut self, mem: &dyn GuestRam) {
        let mut pending = self.dev.pending_queues();
        while pending != 0 {
            let q = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            if self.status.live() {
                self.notify(q, mem);
            }
        }
    }

    fn run_deferred(&mut self, mem: &dyn GuestRam) {
        while self.deferred != 0 {
            let q = self.deferred.trailing_zeros() as usize;
            self.deferred &= !(1 << q);
            self.build_queue(q, mem);
            self.notify(q, mem);
        }
    }

    fn reset(&mut self) {
        self.status = DeviceStatus::default();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix_vector = NO_VECTOR;
        self.queue_select = 0;
        for r in &mut self.regs {
            *r = QueueRegs::new(r.max);
        }
        for q in &mut self.queues {
            *q = None;
        }
        self.deferred = 0;
        self.isr = 0;
        self.update_intx();
        self.dev.reset();
    }

    fn set_status(&mut self, value: u8, mem: Option<&dyn GuestRam>) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status.0;
        let mut new = (value & !STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !self.offered() != 0 || f & (1 << F_VERSION_1) == 0 {
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.status.0 = new;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 && new & STATUS_FEATURES_OK != 0 {
            self.dev.activate(self.driver_features);
            // Chains made available before DRIVER_OK are looked at now.
            for q in 0..self.queues.len() {
                match mem {
                    Some(mem) => self.notify(q, mem),
                    None => self.deferred |= 1 << q,
                }
            }
        }
    }

    // --- common configuration -------------------------------------------------------------

    fn common_snapshot(&self) -> [u8; common::LEN as usize] {
        let mut b = [0u8; common::LEN as usize];
        let put = |b: &mut [u8], at: u64, bytes: &[u8]| {
            b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        let word = |v: u64, sel: u32| if sel < 2 { (v >> (32 * sel)) as u32 } else { 0 };
        put(&mut b, common::DEVICE_FEATURE_SELECT, &self.device_feature_select.to_le_bytes());
        put(&mut b, common::DEVICE_FEATURE, &word(self.offered(), self.device_feature_select).to_le_bytes());
        put(&mut b, common::DRIVER_FEATURE_SELECT, &self.driver_feature_select.to_le_bytes());
        put(&mut b, common::DRIVER_FEATURE, &word(self.driver_features, self.driver_feature_select).to_le_bytes());
        put(&mut b, common::CONFIG_MSIX_VECTOR, &self.config_msix_vector.to_le_bytes());
        put(&mut b, common::NUM_QUEUES, &(self.regs.len() as u16).to_le_bytes());
        b[common::DEVICE_STATUS as usize] = self.status.0;
        b[common::CONFIG_GENERATION as usize] = self.config_generation;
        put(&mut b, common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(r) = self.regs.get(usize::from(self.queue_select)) {
            put(&mut b, common::QUEUE_SIZE, &r.size.to_le_bytes());
            put(&mut b, common::QUEUE_MSIX_VECTOR, &r.msix_vector.to_le_bytes());
            put(&mut b, common::QUEUE_ENABLE, &u16::from(r.enabled).to_le_bytes());
            put(&mut b, common::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(&mut b, common::QUEUE_DESC, &r.desc.to_le_bytes());
            put(&mut b, common::QUEUE_DRIVER, &r.driver.to_le_bytes());
            put(&mut b, common::QUEUE_DEVICE, &r.device.to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, size: u8, value: u64, mem: Option<&dyn GuestRam>) {
        let mut b = self.common_snapshot();
        let n = u64::from(size.clamp(1, 8));
        for i in 0..n {
            if let Some(slot) = b.get_mut((offset + i) as usize) {
                *slot = (value >> (8 * i)) as u8;
            }
        }
        let touches = |at: u64, len: u64| offset < at + len && at < offset + n;
        let u16_at = |at: u64| u16::from_le_bytes([b[at as usize], b[at as usize + 1]]);
        let u32_at =
            |at: u64| u32::from_le_bytes([b[at as usize], b[at as usize + 1], b[at as usize + 2], b[at as usize + 3]]);
        let u64_at = |at: u64| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        let vector = |v: u16, vectors: u16| if v < vectors { v } else { NO_VECTOR };
        if touches(common::DEVICE_FEATURE_SELECT, 4) {
            self.device_feature_select = u32_at(common::DEVICE_FEATURE_SELECT);
        }
        if touches(common::DRIVER_FEATURE_SELECT, 4) {
            self.driver_feature_select = u32_at(common::DRIVER_FEATURE_SELECT);
        }
        if touches(common::DRIVER_FEATURE, 4)
            && self.status.0 & STATUS_FEATURES_OK == 0
            && self.driver_feature_select < 2
        {
            let shift = 32 * self.driver_feature_select;
            let w = u64::from(u32_at(common::DRIVER_FEATURE));
            self.driver_features = (self.driver_features & !(0xFFFF_FFFF << shift)) | w << shift;
        }
        if touches(common::CONFIG_MSIX_VECTOR, 2) {
            self.config_msix_vector = vector(u16_at(common::CONFIG_MSIX_VECTOR), self.msix.vectors());
        }
        if touches(common::QUEUE_SELECT, 2) {
            self.queue_select = u16_at(common::QUEUE_SELECT);
        }
        let vectors = self.msix.vectors();
        let q = usize::from(self.queue_select);
        if let Some(r) = self.regs.get_mut(q) {
            if touches(common::QUEUE_MSIX_VECTOR, 2) {
                r.msix_vector = vector(u16_at(common::QUEUE_MSIX_VECTOR), vectors);
            }
            // Size and addresses are fixed once the queue is enabled (§4.1.4.3.2).
            if !r.enabled {
                if touches(common::QUEUE_SIZE, 2) {
                    r.size = u16_at(common::QUEUE_SIZE);
                }
                if touches(common::QUEUE_DESC, 8) {
                    r.desc = u64_at(common::QUEUE_DESC);
                }
                if touches(common::QUEUE_DRIVER, 8) {
                    r.driver = u64_at(common::QUEUE_DRIVER);
                }
                if touches(common::QUEUE_DEVICE, 8) {
                    r.device = u64_at(common::QUEUE_DEVICE);
                }
                if touches(common::QUEUE_ENABLE, 2) && u16_at(common::QUEUE_ENABLE) == 1 {
                    r.enabled = true;
                    match mem {
                        Some(mem) => self.build_queue(q, mem),
                        None => self.deferred |= 1 << q,
                    }
                }
            }
        }
        if touches(common::DEVICE_STATUS, 1) {
            self.set_status(b[common::DEVICE_STATUS as usize], mem);
        }
    }

    // --- the BAR --------------------------------------------------------------------------

    /// A read of `size` bytes at `offset` into BAR 0.
    pub fn bar_read_mem(&mut self, offset: u64, size: u8, mem: Option<&dyn GuestRam>) -> u64 {
        if let Some(mem) = mem {
            self.run_deferred(mem);
        }
        let n = u64::from(size.clamp(1, 8));
        let within =
            |base: u64, len: u64| offset.checked_sub(base).filter(|o| o.checked_add(n).is_some_and(|e| e <= len));
        if let Some(o) = within(COMMON_OFFSET, common::LEN) {
            return read_bytes(&self.common_snapshot(), o, size);
        }
        if let Some(o) = within(ISR_OFFSET, ISR_LEN) {
            // Reading the ISR clears it and releases INTx (§4.1.4.5).
            let v = if o == 0 { u64::from(self.isr) } else { 0 };
            self.isr = 0;
            self.update_intx();
            return v;
        }
        if let Some(o) = within(DEVICE_OFFSET, DEVICE_MAX_LEN) {
            let mut buf = [0u8; 8];
            self.dev.read_config(o, &mut buf[..n as usize]);
            return u64::from_le_bytes(buf);
        }
        if let Some(o) = within(MSIX_TABLE_OFFSET, self.msix.table_len()) {
            return self.msix.table_read(o, size);
        }
        if let Some(o) = within(MSIX_PBA_OFFSET, self.msix.pba_len()) {
            return self.msix.pba_read(o, size);
        }
        0
    }

    /// A write of the low `size` bytes of `value` at `offset` into BAR 0.
    pub fn bar_write_mem(&mut self, offset: u64, size: u8, value: u64, mem: Option<&dyn GuestRam>) {
        if let Some(mem) = mem {
            self.run_deferred(mem);
        }
        let n = u64::from(size.clamp(1, 8));
        let within =
            |base: u64, len: u64| offset.checked_sub(base).filter(|o| o.checked_add(n).is_some_and(|e| e <= len));
        if let Some(o) = within(COMMON_OFFSET, common::LEN) {
            self.common_write(o, size, value, mem);
        } else if let Some(o) = within(DEVICE_OFFSET, DEVICE_MAX_LEN) {
            let bytes = value.to_le_bytes();
            self.dev.write_config(o, &bytes[..n as usize]);
        } else if let Some(o) = within(NOTIFY_OFFSET, u64::from(NOTIFY_MULTIPLIER) * self.queues.len() as u64) {
            // The queue is the one whose notify address this is (§4.1.4.4); the value (its
            // index, without VIRTIO_F_NOTIFICATION_DATA) adds nothing.
            let q = (o / u64::from(NOTIFY_MULTIPLIER)) as usize;
            match mem {
                Some(mem) => self.notify(q, mem),
                None => self.deferred |= 1 << q,
            }
        } else if let Some(o) = within(MSIX_TABLE_OFFSET, self.msix.table_len()) {
            self.msix.table_write(o, size, value);
        }
    }

    /// The PCI configuration access window's access size and BAR offset, if valid
    /// (§4.1.4.9.1: BAR 0, length 1, 2 or 4, offset aligned to it).
    fn window(&self) -> Option<(u8, u64)> {
        let bar = self.space.get_u8(CAP_PCI_CFG + 4);
        let offset = self.space.read_u32(CAP_PCI_CFG + 8);
        let len = self.space.read_u32(CAP_PCI_CFG + 12);
        (bar == BAR
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len)
            && u64::from(offset) + u64::from(len) <= BAR_SIZE)
            .then_some((len as u8, u64::from(offset)))
    }
}

impl PciFunction for VirtioPci {
    fn config_read(&mut self, offset: u8) -> u32 {
        if offset & 0xFC == PCI_CFG_DATA {
            return match self.window() {
                Some((len, at)) => self.bar_read_mem(at, len, None) as u32,
                None => 0,
            };
        }
        self.space.read_u32(offset)
    }

    fn config_write(&mut self, offset: u8, value: u32, byte_mask: u32) {
        let offset = offset & 0xFC;
        if offset == PCI_CFG_DATA {
            if let Some((len, at)) = self.window() {
                self.bar_write_mem(at, len, u64::from(value), None);
            }
            return;
        }
        self.space.config_write(offset, value, byte_mask);
        if offset == CAP_MSIX {
            self.msix.set_control(self.space.get_u16(CAP_MSIX + 2));
        }
        if offset == CAP_MSIX || offset == OFFSET_COMMAND {
            self.update_intx();
        }
    }

    fn mem_bar_size(&self, bar: u8) -> u64 {
        if bar == BAR {
            BAR_SIZE
        } else {
            0
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, size: u8, cx: &Ctx<'_>) -> u64 {
        if bar != BAR {
            return u64::MAX;
        }
        self.bar_read_mem(offset, size, Some(cx.mem))
    }

    fn bar_write(&mut self, bar: u8, offset: u64, size: u8, value: u64, cx: &Ctx<'_>) {
        if bar == BAR {
            self.bar_write_mem(offset, size, value, Some(cx.mem));
        }
    }

    fn tick(&mut self, cx: &Ctx<'_>) {
        self.run_pending(cx.mem);
    }

    fn next_deadline(&self) -> Option<crate::devices::time::Nanos> {
        (self.dev.pending_queues() != 0).then_some(crate::devices::time::Nanos::ZERO)
    }
}

#[cfg(test)]
mod tests;
