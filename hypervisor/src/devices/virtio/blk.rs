//! virtio-blk request handling (virtio 1.2 §5.2), independent of the transport: a disk image
//! in Vireo's memory, requests taken from validated chains.
//!
//! A request is, in the chain's device-readable stream, the header
//! `{ type: le32, reserved: le32, sector: le64 }` and for writes the data; in its
//! device-writable stream, for reads and GET_ID the data, and last the status byte
//! (§5.2.6). No framing over descriptors is assumed (§2.7.4).
//!
//! Offered: VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE (512), VIRTIO_BLK_F_FLUSH (the
//! image lives in RAM: a flush has nothing to do and says so), VIRTIO_BLK_F_RO for a
//! read-only image. Types IN, OUT, FLUSH and GET_ID; anything else is UNSUPP (§5.2.6.1).
//! A request past the capacity, not a whole number of sectors, or a write to a read-only
//! image is IOERR and changes nothing. A chain that has no room for the header or the status
//! byte is a driver error ([`BlkError::Malformed`]): the transport puts the device into
//! DEVICE_NEEDS_RESET, as for a broken queue.

use core::fmt;

use spin::Mutex;

use super::queue::{Chain, GuestRam, QueueError};
use super::{stream, Queues, VirtioDevice};

/// virtio device type (§5).
pub const DEVICE_TYPE: u16 = 2;
pub const SECTOR_SIZE: u64 = 512;

/// Feature bits (§5.2.3).
pub const F_SEG_MAX: u32 = 2;
pub const F_RO: u32 = 5;
pub const F_BLK_SIZE: u32 = 6;
pub const F_FLUSH: u32 = 9;

/// Request types (§5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Status values (§5.2.6).
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Length of the request header in the readable stream.
pub const HEADER_LEN: u64 = 16;
/// Length of the GET_ID answer (§5.2.6: "up to 20 bytes", zero-padded, not terminated).
pub const ID_LEN: usize = 20;

/// Offsets in the device configuration space (§5.2.4, `struct virtio_blk_config`).
pub mod config {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    /// The part of the structure Vireo fills (through `blk_size`); the rest reads 0.
    pub const LEN: usize = 24;
}

/// A chain the driver built against the rules of §5.2.6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    Queue(QueueError),
    /// No room for the 16-byte header or the status byte.
    Malformed {
        readable: u64,
        writable: u64,
    },
}

impl From<QueueError> for BlkError {
    fn from(e: QueueError) -> Self {
        BlkError::Queue(e)
    }
}

/// For the transport, both kinds are the driver's fault: the device needs reset.
impl From<BlkError> for QueueError {
    fn from(e: BlkError) -> Self {
        match e {
            BlkError::Queue(e) => e,
            BlkError::Malformed { readable, writable } => QueueError::Malformed { readable, writable },
        }
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Queue(e) => e.fmt(f),
            BlkError::Malformed { readable, writable } => write!(
                f,
                "block request with {readable} readable and {writable} writable bytes (needs a 16-byte header and a status byte)"
            ),
        }
    }
}

/// What a VM's block device has done, for the statistics lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// A disk image and the requests on it.
pub struct Blk<S> {
    image: S,
    read_only: bool,
    /// Identifies the disk to the guest (GET_ID, `/sys/block/vda/serial`).
    id: [u8; ID_LEN],
    seg_max: u32,
    pub stats: BlkStats,
}

impl<S: AsRef<[u8]> + AsMut<[u8]>> Blk<S> {
    /// A device over `image` (its whole 512-byte sectors; a tail shorter than a sector is not
    /// visible), `serial` truncated to 20 bytes, at most `seg_max` data buffers a request.
    pub fn new(image: S, read_only: bool, serial: &str, seg_max: u32) -> Self {
        let mut id = [0; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Blk { image, read_only, id, seg_max, stats: BlkStats::default() }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.image.as_ref().len() as u64 / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device-specific feature bits to offer.
    pub fn features(&self) -> u64 {
        let mut f = (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH);
        if self.read_only {
            f |= 1 << F_RO;
        }
        f
    }

    /// Reads `data.len()` bytes of the configuration space at `offset` (bytes past the
    /// structure read 0).
    pub fn config_read(&self, offset: usize, data: &mut [u8]) {
        let mut cfg = [0u8; config::LEN];
        cfg[config::CAPACITY..config::CAPACITY + 8].copy_from_slice(&self.capacity().to_le_bytes());
        // size_max stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered, any buffer size is fine.
        cfg[config::SEG_MAX..config::SEG_MAX + 4].copy_from_slice(&self.seg_max.to_le_bytes());
        cfg[config::BLK_SIZE..config::BLK_SIZE + 4].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i).and_then(|o| cfg.get(o)).copied().unwrap_or(0);
        }
    }

    /// The serial number GET_ID answers (up to 20 bytes).
    pub fn serial(&self) -> &str {
        let n = self.id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        core::str::from_utf8(&self.id[..n]).unwrap_or("")
    }

    /// The image's bytes (to save or compare it).
    pub fn image(&self) -> &[u8] {
        self.image.as_ref()
    }

    /// Carries out the request in `chain`; returns the number of bytes written into the chain
    /// (the used element's `len`), the status byte included.
    pub fn handle(&mut self, chain: &Chain, mem: &(impl GuestRam + ?Sized)) -> Result<u32, BlkError> {
        let (readable, writable) = (chain.readable_len(), chain.writable_len());
        if readable < HEADER_LEN || writable < 1 {
            return Err(BlkError::Malformed { readable, writable });
        }
        let mut header = [0u8; HEADER_LEN as usize];
        stream::read(chain, mem, 0, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(s);
        let status_at = writable - 1;
        let (status, data_written) = match kind {
            T_IN => self.transfer(sector, status_at, |img, off, n| {
                stream::write(chain, mem, 0, &img[off..off + n]).map(|_| ())
            })?,
            T_OUT if self.read_only => (S_IOERR, 0),
            T_OUT => {
                let n = readable - HEADER_LEN;
                self.transfer_out(sector, n, chain, mem)?
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                (S_OK, 0)
            }
            T_GET_ID => {
                let n = usize::try_from(status_at).unwrap_or(usize::MAX).min(ID_LEN);
                stream::write(chain, mem, 0, &self.id[..n])?;
                (S_OK, n as u64)
            }
            _ => (S_UNSUPP, 0),
        };
        if status != S_OK {
            self.stats.errors += 1;
        }
        stream::write(chain, mem, status_at, &[status])?;
        // The chain is at most 4 GiB (checked by the queue), so this fits.
        Ok(u32::try_from(data_written + 1).unwrap_or(u32::MAX))
    }

    /// The byte range of `len` bytes from `sector`, if it is whole sectors inside the image.
    fn range(&self, sector: u64, len: u64) -> Option<(usize, usize)> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        if end > self.capacity() * SECTOR_SIZE {
            return None;
        }
        Some((usize::try_from(start).ok()?, usize::try_from(len).ok()?))
    }

    /// A read: `len` is the writable stream before the status byte.
    fn transfer(
        &mut self,
        sector: u64,
        len: u64,
        copy: impl FnOnce(&[u8], usize, usize) -> Result<(), QueueError>,
    ) -> Result<(u8, u64), BlkError> {
        let Some((off, n)) = self.range(sector, len) else { return Ok((S_IOERR, 0)) };
        copy(self.image.as_ref(), off, n)?;
        self.stats.reads += 1;
        self.stats.bytes_read += len;
        Ok((S_OK, len))
    }

    /// A write of the `len` readable bytes after the header.
    fn transfer_out(
        &mut self,
        sector: u64,
        len: u64,
        chain: &Chain,
        mem: &(impl GuestRam + ?Sized),
    ) -> Result<(u8, u64), BlkError> {
        let Some((off, n)) = self.range(sector, len) else { return Ok((S_IOERR, 0)) };
        stream::read(chain, mem, HEADER_LEN, &mut self.image.as_mut()[off..off + n])?;
        self.stats.writes += 1;
        self.stats.bytes_written += len;
        Ok((S_OK, 0))
    }
}

/// The one request queue (requestq, §5.2.2; VIRTIO_BLK_F_MQ is not offered).
pub const REQUESTQ: u16 = 0;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 128;
/// Data buffers a request may have (`seg_max`, §5.2.4): the queue size less the header and
/// status descriptors, so that a direct chain always fits the ring.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// PCI class: mass storage, SCSI (0x0100), as QEMU's virtio-blk-pci.
pub const PCI_CLASS: u32 = 0x01_00_00;

/// A VM's disk: an image in Vireo's memory. It outlives the VM's devices, which a guest reset
/// builds again, so it is shared: the transport's device and the VM's end-of-run statistics
/// both reach it through a `&'static`.
pub type Disk = Mutex<Blk<&'static mut [u8]>>;

/// A reference to a [`Disk`] that VM descriptions can copy around.
#[derive(Clone, Copy)]
pub struct DiskRef(pub &'static Disk);

impl fmt::Debug for DiskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0.lock();
        write!(f, "Disk {{ sectors: {}, ro: {}, serial: {:?} }}", d.capacity(), d.read_only(), d.serial())
    }
}

impl PartialEq for DiskRef {
    fn eq(&self, other: &Self) -> bool {
        core::ptr::eq(self.0, other.0)
    }
}

impl Eq for DiskRef {}

/// virtio-blk (virtio 1.2 §5.2, device type 2) on a shared disk: queue 0 carries requests,
/// each handled by [`Blk::handle`].
pub struct VirtioBlk<S: 'static> {
    disk: &'static Mutex<Blk<S>>,
}

impl<S: AsRef<[u8]> + AsMut<[u8]> + Send + 'static> VirtioBlk<S> {
    pub fn new(disk: &'static Mutex<Blk<S>>) -> Self {
        VirtioBlk { disk }
    }

    /// Drains the request queue with notifications off, then turns them back on and looks
    /// once more (§2.7.10: a chain made available meanwhile would otherwise wait for the
    /// next kick): one exit serves every request the driver queued before it.
    fn requests(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        let mut disk = self.disk.lock();
        queues.disable_notifications(REQUESTQ)?;
        loop {
            while let Some(chain) = queues.pop(REQUESTQ)? {
                let written = disk.handle(&chain, queues.mem())?;
                queues.push_used(REQUESTQ, chain.head, written)?;
            }
            if !queues.enable_notifications(REQUESTQ)? {
                return Ok(());
            }
        }
    }
}

impl<S: AsRef<[u8]> + AsMut<[u8]> + Send + 'static> VirtioDevice for VirtioBlk<S> {
    fn name(&self) -> &'static str {
        "blk"
    }

    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS
    }

    fn features(&self) -> u64 {
        self.disk.lock().features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        config::LEN as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.disk.lock().config_read(usize::try_from(offset).unwrap_or(usize::MAX), data);
    }

    fn notify(&mut self, queue: u16, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        match queue {
            REQUESTQ => self.requests(queues),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::stream::tests::{chain, FlatRam};
    use alloc::vec;
    use alloc::vec::Vec;

    const HDR: u64 = 0x100;
    const DATA: u64 = 0x1000;
    const STATUS: u64 = 0x200;

    fn disk(sectors: usize) -> Vec<u8> {
        (0..sectors * 512).map(|i| (i / 512) as u8 ^ (i as u8)).collect()
    }

    fn put_header(mem: &FlatRam, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write(HDR, &h).unwrap();
    }

    fn status(mem: &FlatRam) -> u8 {
        mem.0.borrow()[STATUS as usize]
    }

    #[test]
    fn read_write_round_trip_over_split_buffers() {
        let mem = FlatRam::new(0x10000);
        let mut blk = Blk::new(disk(8), false, "vireo-disk0", 126);
        assert_eq!(blk.capacity(), 8);
        // Read sectors 2-3 into two buffers of 512 and 512 bytes.
        put_header(&mem, T_IN, 2);
        let c = chain(&[(HDR, 16, false), (DATA, 512, true), (DATA + 0x800, 512, true), (STATUS, 1, true)]);
        assert_eq!(blk.handle(&c, &mem).unwrap(), 1025);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(&mem.0.borrow()[DATA as usize..DATA as usize + 512], &blk.image()[1024..1536]);
        assert_eq!(&mem.0.borrow()[DATA as usize + 0x800..DATA as usize + 0xA00], &blk.image()[1536..2048]);

        // Write one sector whose data shares the header's buffer, status at the end of a
        // data-sized writable buffer.
        mem.write(HDR + 16, &[0x5A; 512]).unwrap();
        put_header(&mem, T_OUT, 7);
        let c = chain(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
        assert_eq!(blk.handle(&c, &mem).unwrap(), 1);
        assert_eq!(status(&mem), S_OK);
        assert!(blk.image()[7 * 512..].iter().all(|&b| b == 0x5A));
        assert_eq!(blk.stats.reads, 1);
        assert_eq!(blk.stats.writes, 1);
        assert_eq!(blk.stats.bytes_written, 512);
    }

    #[test]
    fn out_of_range_partial_sectors_and_read_only_are_ioerr_and_change_nothing() {
        let mem = FlatRam::new(0x10000);
        let mut blk = Blk::new(disk(4), false, "d", 126);
        let before = blk.image().to_vec();
        for (kind, sector, len) in
            [(T_IN, 4, 512), (T_IN, 3, 1024), (T_OUT, 3, 1024), (T_IN, 0, 100), (T_OUT, u64::MAX / 2, 512)]
        {
            put_header(&mem, kind, sector);
            let c = if kind == T_IN {
                chain(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)])
            } else {
                chain(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
            };
            assert_eq!(blk.handle(&c, &mem).unwrap(), 1, "{kind} {sector} {len}");
            assert_eq!(status(&mem), S_IOERR);
        }
        assert_eq!(blk.image(), &before[..]);

        let mut ro = Blk::new(disk(4), true, "d", 126);
        assert_ne!(ro.features() & (1 << F_RO), 0);
        put_header(&mem, T_OUT, 0);
        let c = chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        ro.handle(&c, &mem).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        assert_eq!(ro.image(), &before[..]);
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let mem = FlatRam::new(0x10000);
        let mut blk = Blk::new(disk(1), false, "serial-number-longer-than-twenty", 126);
        put_header(&mem, T_FLUSH, 0);
        assert_eq!(blk.handle(&chain(&[(HDR, 16, false), (STATUS, 1, true)]), &mem).unwrap(), 1);
        assert_eq!(status(&mem), S_OK);

        put_header(&mem, T_GET_ID, 0);
        let c = chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!(blk.handle(&c, &mem).unwrap(), 21);
        assert_eq!(&mem.0.borrow()[DATA as usize..DATA as usize + 20], b"serial-number-longer");
        assert_eq!(status(&mem), S_OK);

        put_header(&mem, 11, 0); // DISCARD: not offered
        blk.handle(&chain(&[(HDR, 16, false), (STATUS, 1, true)]), &mem).unwrap();
        assert_eq!(status(&mem), S_UNSUPP);
    }

    #[test]
    fn chains_without_header_or_status_are_driver_errors() {
        let mem = FlatRam::new(0x10000);
        let mut blk = Blk::new(disk(1), false, "d", 126);
        assert!(matches!(
            blk.handle(&chain(&[(HDR, 8, false), (STATUS, 1, true)]), &mem),
            Err(BlkError::Malformed { .. })
        ));
        assert!(matches!(blk.handle(&chain(&[(HDR, 16, false)]), &mem), Err(BlkError::Malformed { .. })));
    }

    #[test]
    fn config_space_names_capacity_seg_max_and_block_size() {
        let blk = Blk::new(vec![0u8; 3 * 512 + 100], false, "d", 126);
        let mut cfg = [0xFFu8; 32];
        blk.config_read(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
        assert!(cfg[24..].iter().all(|&b| b == 0));
        let mut far = [0xFFu8; 4];
        blk.config_read(usize::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }

    /// The device on a real split queue: two requests queued before one notification are
    /// both served by it (a write, then a read of the same sector), with the used ring
    /// naming each head and the bytes written; a chain with no status byte is a driver
    /// error the transport turns into "needs reset".
    #[test]
    fn the_device_drains_the_request_queue() {
        use crate::devices::virtio::queue::{Descriptor, QueueConfig, QueueFeatures, SplitQueue};
        const DESC: u64 = 0x4000;
        const AVAIL: u64 = 0x5000;
        const USED: u64 = 0x6000;
        let mem = FlatRam::new(0x10000);
        let disk: &'static Mutex<Blk<Vec<u8>>> =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(Mutex::new(Blk::new(disk(4), false, "q", SEG_MAX))));
        let mut dev = VirtioBlk::new(disk);
        let d = |addr, len, flags, next| Descriptor { addr, len, flags, next }.to_bytes();
        // Chain 0 (descriptors 0-2): OUT sector 1 from 0x8000. Chain 1 (3-5): IN sector 1
        // into 0x9000.
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&1u64.to_le_bytes());
        mem.write(0x7000, &h).unwrap();
        h[..4].copy_from_slice(&T_IN.to_le_bytes());
        mem.write(0x7100, &h).unwrap();
        mem.write(0x8000, &[0xC3; 512]).unwrap();
        for (i, e) in [
            d(0x7000, 16, 1, 1),
            d(0x8000, 512, 1, 2),
            d(0x7200, 1, 2, 0),
            d(0x7100, 16, 1, 4),
            d(0x9000, 512, 3, 5),
            d(0x7300, 1, 2, 0),
            d(0x7400, 16, 0, 0),
        ]
        .iter()
        .enumerate()
        {
            mem.write(DESC + 16 * i as u64, e).unwrap();
        }
        mem.write(AVAIL + 4, &[0, 0, 3, 0]).unwrap();
        mem.write(AVAIL + 2, &2u16.to_le_bytes()).unwrap();
        let cfg = QueueConfig { size: 8, desc: DESC, avail: AVAIL, used: USED };
        let mut queues = [Some(SplitQueue::new(cfg, QueueFeatures::default(), &mem).unwrap())];
        let mut q = Queues::new(&mut queues, &mem);
        dev.notify(REQUESTQ, &mut q).unwrap();
        assert_eq!(q.used(), 1);
        let m = mem.0.borrow();
        let u32_at = |a: usize| u32::from_le_bytes(m[a..a + 4].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([m[USED as usize + 2], m[USED as usize + 3]]), 2, "both used");
        assert_eq!((u32_at(USED as usize + 4), u32_at(USED as usize + 8)), (0, 1));
        assert_eq!((u32_at(USED as usize + 12), u32_at(USED as usize + 16)), (3, 513));
        assert_eq!((m[0x7200], m[0x7300]), (S_OK, S_OK));
        assert!(m[0x9000..0x9200].iter().all(|&b| b == 0xC3), "read back what was written");
        drop(m);
        assert_eq!(disk.lock().stats.writes, 1);
        assert_eq!(disk.lock().stats.reads, 1);
        // Chain 2: a lone readable header, no status byte.
        mem.write(AVAIL + 8, &6u16.to_le_bytes()).unwrap();
        mem.write(AVAIL + 2, &3u16.to_le_bytes()).unwrap();
        assert_eq!(dev.notify(REQUESTQ, &mut q), Err(QueueError::Malformed { readable: 16, writable: 0 }));
    }

    /// Random requests (any type, sector and framing) never panic, never touch the image
    /// outside the sectors a successful write names, and always write a status byte.
    #[test]
    fn random_requests_are_contained() {
        let mem = FlatRam::new(0x20000);
        let mut blk = Blk::new(disk(16), false, "fuzz", 126);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let before = blk.image().to_vec();
            let kind = [T_IN, T_OUT, T_FLUSH, T_GET_ID, 3, 11, u32::MAX][(next() % 7) as usize];
            let sector = match next() % 4 {
                0 => next(),
                _ => next() % 20,
            };
            put_header(&mem, kind, sector);
            let mut bufs = alloc::vec![(HDR, 16 + (next() % 3) as u32 * 256, false)];
            for _ in 0..next() % 4 {
                let w = next() % 2 == 0;
                bufs.push((DATA + (next() % 8) * 0x1000, 1 + (next() % 2048) as u32, w));
            }
            bufs.push((STATUS, 1, true));
            // Readable buffers first, as the queue guarantees.
            bufs.sort_by_key(|b| b.2);
            let c = chain(&bufs);
            mem.write(STATUS, &[0xEE]).unwrap();
            let r = blk.handle(&c, &mem);
            let n = r.expect("well-framed chains are never driver errors");
            assert!(u64::from(n) <= c.writable_len());
            let st = status(&mem);
            assert!(st <= S_UNSUPP, "status written: {st}");
            if !(kind == T_OUT && st == S_OK) {
                assert_eq!(blk.image(), &before[..], "only a successful write changes the image");
            }
        }
    }
}
