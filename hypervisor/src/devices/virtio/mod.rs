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
pub mod net;
pub mod queue;
pub mod stream;

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
