//! virtio-net frame handling (virtio 1.2 §5.1), independent of the transport: taking a frame
//! from a transmit chain and placing one into a receive chain, each behind the 12-byte
//! `virtio_net_hdr` (§5.1.6; with VIRTIO_F_VERSION_1 it always has `num_buffers`).
//!
//! Offered: VIRTIO_NET_F_MAC (the address Vireo assigns), VIRTIO_NET_F_STATUS (link up),
//! VIRTIO_NET_F_MTU (1500). No checksum or segmentation offload: the header a driver sends
//! must then have `flags` 0 and `gso_type` NONE; frames are at most [`MAX_FRAME`] bytes.
//! A transmit chain breaking that is dropped and counted, not a device error (a real NIC
//! drops a bad frame too); the receive side writes `num_buffers` 1 (no VIRTIO_NET_F_MRG_RXBUF)
//! and drops a frame for which the driver's buffer is too small.

use super::queue::{Chain, GuestRam, QueueError};
use super::stream;
use crate::devices::switch::Mac;

/// virtio device type (§5).
pub const DEVICE_TYPE: u16 = 1;

/// Feature bits (§5.1.3).
pub const F_MTU: u32 = 3;
pub const F_MAC: u32 = 5;
pub const F_STATUS: u32 = 16;

/// `virtio_net_hdr` length with VERSION_1 (§5.1.6).
pub const HEADER_LEN: usize = 12;
pub const MTU: u16 = 1500;
/// The largest frame without offloads: MTU + Ethernet header (+ an 802.1Q tag).
pub const MAX_FRAME: usize = MTU as usize + 14 + 4;

/// `status` in the configuration space: VIRTIO_NET_S_LINK_UP.
pub const S_LINK_UP: u16 = 1;

/// Offsets in `struct virtio_net_config` (§5.1.4).
pub mod config {
    pub const MAC: usize = 0;
    pub const STATUS: usize = 6;
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    pub const MTU: usize = 10;
    pub const LEN: usize = 12;
}

/// Queue indices (§5.1.2): one pair.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// The header's `gso_type` VIRTIO_NET_HDR_GSO_NONE and the header Vireo writes on receive.
const GSO_NONE: u8 = 0;

/// Why a transmitted chain carried no frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxDrop {
    /// Shorter than the header plus an Ethernet header.
    Runt,
    /// Longer than [`MAX_FRAME`] after the header.
    TooBig,
    /// Header asks for an offload that was not negotiated.
    Offload,
}

/// Per-device counters, for the statistics lines and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames for which the guest had no (large enough) receive buffer.
    pub rx_dropped: u64,
}

/// The device-specific feature bits to offer.
pub fn features() -> u64 {
    (1 << F_MAC) | (1 << F_STATUS) | (1 << F_MTU)
}

/// Reads the configuration space of a NIC with address `mac`.
pub fn config_read(mac: Mac, offset: usize, data: &mut [u8]) {
    let mut cfg = [0u8; config::LEN];
    cfg[config::MAC..config::MAC + 6].copy_from_slice(&mac.0);
    cfg[config::STATUS..config::STATUS + 2].copy_from_slice(&S_LINK_UP.to_le_bytes());
    cfg[config::MAX_VIRTQUEUE_PAIRS..config::MAX_VIRTQUEUE_PAIRS + 2].copy_from_slice(&1u16.to_le_bytes());
    cfg[config::MTU..config::MTU + 2].copy_from_slice(&MTU.to_le_bytes());
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset.checked_add(i).and_then(|o| cfg.get(o)).copied().unwrap_or(0);
    }
}

/// Checks transmit chain `chain`'s header and length; returns the frame's length (it follows
/// the header), or why the chain is dropped.
fn tx_len(chain: &Chain, mem: &(impl GuestRam + ?Sized)) -> Result<Result<usize, TxDrop>, QueueError> {
    let total = chain.readable_len();
    if total < (HEADER_LEN + crate::devices::switch::ETH_HEADER_LEN) as u64 {
        return Ok(Err(TxDrop::Runt));
    }
    let len = total - HEADER_LEN as u64;
    if len > MAX_FRAME as u64 {
        return Ok(Err(TxDrop::TooBig));
    }
    let mut hdr = [0u8; HEADER_LEN];
    stream::read(chain, mem, 0, &mut hdr)?;
    // flags (byte 0) must not ask for checksumming, gso_type (byte 1) must be NONE.
    if hdr[0] != 0 || hdr[1] != GSO_NONE {
        return Ok(Err(TxDrop::Offload));
    }
    Ok(Ok(len as usize))
}

/// Copies the frame of transmit chain `chain` into `frame` (which must hold [`MAX_FRAME`]
/// bytes); returns its length, or why it is dropped.
pub fn take_tx(
    chain: &Chain,
    mem: &(impl GuestRam + ?Sized),
    frame: &mut [u8; MAX_FRAME],
) -> Result<Result<usize, TxDrop>, QueueError> {
    let len = match tx_len(chain, mem)? {
        Ok(len) => len,
        Err(d) => return Ok(Err(d)),
    };
    stream::read(chain, mem, HEADER_LEN as u64, &mut frame[..len])?;
    Ok(Ok(len))
}

/// The frame of transmit chain `chain` in a buffer of its own (its one copy out of guest
/// RAM), or why it is dropped.
pub fn take_tx_vec(
    chain: &Chain,
    mem: &(impl GuestRam + ?Sized),
) -> Result<Result<alloc::vec::Vec<u8>, TxDrop>, QueueError> {
    let len = match tx_len(chain, mem)? {
        Ok(len) => len,
        Err(d) => return Ok(Err(d)),
    };
    let mut frame = alloc::vec![0u8; len];
    stream::read(chain, mem, HEADER_LEN as u64, &mut frame)?;
    Ok(Ok(frame))
}

/// Writes the header and `frame` into receive chain `chain`; returns the used length, or
/// `None` if the chain is too small (the frame is dropped; the chain is still returned, empty).
pub fn put_rx(chain: &Chain, mem: &(impl GuestRam + ?Sized), frame: &[u8]) -> Result<Option<u32>, QueueError> {
    let need = (HEADER_LEN + frame.len()) as u64;
    if chain.writable_len() < need {
        return Ok(None);
    }
    let mut hdr = [0u8; HEADER_LEN];
    // num_buffers (le16 at offset 10) is 1 without VIRTIO_NET_F_MRG_RXBUF (§5.1.6.3.1).
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    stream::write(chain, mem, 0, &hdr)?;
    stream::write(chain, mem, HEADER_LEN as u64, frame)?;
    Ok(Some(need as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::stream::tests::{chain, FlatRam};

    #[test]
    fn tx_takes_the_frame_after_the_header_across_buffers() {
        let mem = FlatRam::new(0x4000);
        mem.write(0x100, &[0; 12]).unwrap();
        let payload: alloc::vec::Vec<u8> = (0..100u8).collect();
        mem.write(0x200, &payload[..40]).unwrap();
        mem.write(0x300, &payload[40..]).unwrap();
        let c = chain(&[(0x100, 12, false), (0x200, 40, false), (0x300, 60, false)]);
        let mut f = [0u8; MAX_FRAME];
        assert_eq!(take_tx(&c, &mem, &mut f).unwrap(), Ok(100));
        assert_eq!(&f[..100], &payload[..]);
    }

    #[test]
    fn tx_drops_runts_giants_and_offloads() {
        let mem = FlatRam::new(0x4000);
        let mut f = [0u8; MAX_FRAME];
        assert_eq!(take_tx(&chain(&[(0x100, 20, false)]), &mem, &mut f).unwrap(), Err(TxDrop::Runt));
        let big = chain(&[(0x100, (HEADER_LEN + MAX_FRAME + 1) as u32, false)]);
        assert_eq!(take_tx(&big, &mem, &mut f).unwrap(), Err(TxDrop::TooBig));
        mem.write(0x100, &[1, 0]).unwrap(); // VIRTIO_NET_HDR_F_NEEDS_CSUM
        assert_eq!(take_tx(&chain(&[(0x100, 80, false)]), &mem, &mut f).unwrap(), Err(TxDrop::Offload));
    }

    #[test]
    fn rx_writes_header_with_one_buffer_and_drops_what_does_not_fit() {
        let mem = FlatRam::new(0x4000);
        let frame = [0xABu8; 64];
        let c = chain(&[(0x1000, 1526, true)]);
        assert_eq!(put_rx(&c, &mem, &frame).unwrap(), Some(76));
        let m = mem.0.borrow();
        assert_eq!(&m[0x1000..0x100C], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&m[0x100C..0x100C + 64], &frame[..]);
        drop(m);
        assert_eq!(put_rx(&chain(&[(0x2000, 40, true)]), &mem, &frame).unwrap(), None);
    }

    #[test]
    fn config_space_has_the_mac_link_up_one_pair_and_the_mtu() {
        let mut cfg = [0u8; 12];
        config_read(Mac::for_vm(3, 1), 0, &mut cfg);
        assert_eq!(&cfg[..6], &[0x0A, 0x56, 0x52, 0, 3, 1]);
        assert_eq!(&cfg[6..], &[1, 0, 1, 0, 0xDC, 0x05]);
    }
}
