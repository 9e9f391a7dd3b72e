//! virtio 1.x (OASIS "Virtual I/O Device (VIRTIO) Version 1.2", cited as "virtio 1.2 §n")
//! building blocks shared by the virtio devices: the device status field and the feature bits
//! of the transport-independent part, [`queue`] (the split virtqueue), [`stream`] (a chain as
//! a readable and a writable byte stream), and the request logic of the devices, free of any
//! transport: [`blk`] (block requests on a disk image) and [`net`] (frames in and out of
//! chains; the switch between VMs is `devices::switch`).
//!
//! Nothing here trusts the driver: every index, address and length read from guest memory is
//! checked, and what breaks the rules is a [`queue::QueueError`], which the device turns
//! into the "needs reset" state ([`STATUS_DEVICE_NEEDS_RESET`], virtio 1.2 §2.1.2) instead of
//! a panic: the VM's other devices, the VM and Vireo go on.

pub mod blk;
pub mod console;
pub mod net;
pub mod netdev;
pub mod pci;
pub mod queue;
pub mod stream;

use queue::{Chain, GuestRam, QueueError, SplitQueue};

/// Device status bits (virtio 1.2 §2.1): what the driver has done so far.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
/// Set by the device: it hit an error it cannot recover from; the driver must reset it
/// (virtio 1.2 §2.1.2: the device SHOULD set it and then send a configuration change
/// notification when DRIVER_OK is set).
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
pub const STATUS_FAILED: u8 = 128;

/// Feature bits reserved for the transport and ring (virtio 1.2 §6).
/// The driver may use descriptors with VIRTQ_DESC_F_INDIRECT (§2.7.5.3).
pub const F_INDIRECT_DESC: u32 = 28;
/// The `used_event` and `avail_event` fields (§2.7.7, §2.7.10).
pub const F_EVENT_IDX: u32 = 29;
/// Compliance with virtio 1.x (no legacy interface) (§6.1).
pub const F_VERSION_1: u32 = 32;

/// A device's status field, with the one transition the device itself makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStatus(pub u8);

impl DeviceStatus {
    /// Whether the driver has finished setting the device up (DRIVER_OK) and it has not
    /// failed since.
    pub fn live(self) -> bool {
        self.0 & STATUS_DRIVER_OK != 0 && self.0 & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED) == 0
    }

    /// Enters the "needs reset" state after a driver error; returns whether it is new (the
    /// device then sends a configuration change notification if DRIVER_OK is set, §2.1.2).
    pub fn set_needs_reset(&mut self) -> bool {
        let new = self.0 & STATUS_DEVICE_NEEDS_RESET == 0;
        self.0 |= STATUS_DEVICE_NEEDS_RESET;
        new
    }

    pub fn needs_reset(self) -> bool {
        self.0 & STATUS_DEVICE_NEEDS_RESET != 0
    }
}

/// Device types (virtio 1.2 §5).
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const TYPE_CONSOLE: u16 = 3;

/// A device's enabled queues while it handles a notification: it takes chains, reads and
/// writes guest memory, and returns chains; the transport then sends a used-buffer
/// notification for every queue that got used buffers, if the driver wants one.
pub struct Queues<'a> {
    queues: &'a mut [Option<SplitQueue>],
    mem: &'a dyn GuestRam,
    used: u64,
}

impl<'a> Queues<'a> {
    /// `queues[i]` is queue `i` once the driver has enabled it.
    pub fn new(queues: &'a mut [Option<SplitQueue>], mem: &'a dyn GuestRam) -> Self {
        Self { queues, mem, used: 0 }
    }

    /// Guest RAM (checked access).
    pub fn mem(&self) -> &'a dyn GuestRam {
        self.mem
    }

    /// The next available chain of queue `q`; `Ok(None)` if there is none or the queue is not
    /// enabled.
    pub fn pop(&mut self, q: u16) -> Result<Option<Chain>, QueueError> {
        match self.queues.get_mut(usize::from(q)) {
            Some(Some(queue)) => queue.pop(&self.mem),
            _ => Ok(None),
        }
    }

    /// Returns chain `head` of queue `q` with `written` bytes written.
    pub fn push_used(&mut self, q: u16, head: u16, written: u32) -> Result<(), QueueError> {
        match self.queues.get_mut(usize::from(q)) {
            Some(Some(queue)) => {
                queue.push_used(&self.mem, head, written)?;
                if q < 64 {
                    self.used |= 1 << q;
                }
                Ok(())
            }
            _ => Err(QueueError::BadUsedId(head)),
        }
    }

    /// Asks for kicks on queue `q` again after draining it ([`SplitQueue::enable_notifications`]);
    /// `true` if chains arrived meanwhile (drain again).
    pub fn enable_notifications(&mut self, q: u16) -> Result<bool, QueueError> {
        match self.queues.get_mut(usize::from(q)) {
            Some(Some(queue)) => queue.enable_notifications(&self.mem),
            _ => Ok(false),
        }
    }

    /// No kicks needed on queue `q` while the device drains it.
    pub fn disable_notifications(&mut self, q: u16) -> Result<(), QueueError> {
        match self.queues.get_mut(usize::from(q)) {
            Some(Some(queue)) => queue.disable_notifications(&self.mem),
            _ => Ok(()),
        }
    }

    /// The queues that got used buffers (bit `q` = queue `q`).
    pub fn used(&self) -> u64 {
        self.used
    }
}

/// One virtio device, as the transport ([`pci::VirtioPci`]) sees it: a device is one file
/// implementing this trait. The transport owns feature negotiation, the queues' setup, the
/// status field, interrupts and the "needs reset" state; the device says what it offers and
/// does the work of a notification.
pub trait VirtioDevice: Send {
    /// A short name for messages ("console").
    fn name(&self) -> &'static str;
    /// The virtio device type (virtio 1.2 §5): [`TYPE_CONSOLE`], ...
    fn device_type(&self) -> u16;
    /// The PCI class code (base class << 16 | subclass << 8 | programming interface).
    fn pci_class(&self) -> u32;
    /// Device-specific feature bits offered (bits 0-23); the transport adds VERSION_1,
    /// INDIRECT_DESC and EVENT_IDX.
    fn features(&self) -> u64;
    /// The largest size of each queue (the number of queues is the slice's length).
    fn queue_max_sizes(&self) -> &[u16];
    /// The device configuration space's length in bytes.
    fn config_len(&self) -> u64;
    /// Reads device configuration bytes from `offset` (bytes past its end read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration bytes (read-only fields ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with `features` negotiated.
    fn activate(&mut self, _features: u64) {}
    /// The driver notified queue `queue` (available buffers), or the transport asks the
    /// device to look at it. An error means the driver broke the rules: the device needs reset.
    fn notify(&mut self, queue: u16, queues: &mut Queues<'_>) -> Result<(), QueueError>;
    /// The driver reset the device (status 0): back to the initial state.
    fn reset(&mut self) {}
    /// Queues (bit q) with work that came from outside the VM (frames from another VM): the
    /// transport runs [`VirtioDevice::notify`] for them at the VM's next device tick.
    fn pending_queues(&self) -> u64 {
        0
    }
}

/// Devices in their own storage, for the transport's `Box`.
pub type BoxedDevice = alloc::boxed::Box<dyn VirtioDevice>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_reset_is_sticky_and_stops_the_device() {
        let mut s = DeviceStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(s.live());
        assert!(s.set_needs_reset());
        assert!(!s.set_needs_reset(), "already set");
        assert!(s.needs_reset() && !s.live());
        assert_eq!(s.0, 0x4F);
        assert!(!DeviceStatus(STATUS_DRIVER_OK | STATUS_FAILED).live());
    }
}
