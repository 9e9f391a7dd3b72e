//! The split virtqueue, device side (virtio 1.2 §2.7), with indirect descriptors
//! (VIRTIO_F_INDIRECT_DESC, §2.7.5.3) and event-index notification suppression
//! (VIRTIO_F_EVENT_IDX, §2.7.7, §2.7.10).
//!
//! Three areas in guest memory, placed by the driver:
//!
//! | area             | layout                                                        | align |
//! |------------------|---------------------------------------------------------------|-------|
//! | descriptor table | `size` x [`Descriptor`] (16 bytes)                            | 16    |
//! | available ring   | flags u16, idx u16, ring[size] u16, used_event u16            | 2     |
//! | used ring        | flags u16, idx u16, ring[size] [`UsedElem`] (8), avail_event u16 | 4  |
//!
//! All fields little-endian (virtio 1.x). The driver publishes chains by writing their head
//! index into the available ring and advancing its `idx`; the device takes them in order
//! ([`SplitQueue::pop`]), and returns each with the number of bytes it wrote through the used
//! ring ([`SplitQueue::push_used`]); [`SplitQueue::needs_notification`] says whether the driver
//! wants an interrupt for that.
//!
//! Nothing read from guest memory is trusted. [`SplitQueue::pop`] validates the whole chain
//! before handing any of it out; a broken one is a [`QueueError`] and the queue stays broken
//! (every later call returns the same error) until the device is reset: the device sets
//! DEVICE_NEEDS_RESET (`super::STATUS_DEVICE_NEEDS_RESET`). What is checked:
//! - the rings lie wholly in RAM and are aligned, the size is a power of two up to 32768;
//! - the available index moves ahead by at most the queue size;
//! - every head and `next` index is inside its table, no chain revisits a descriptor (a
//!   loop), and no head is made available again while the device still holds its chain;
//! - a chain has at most `size` descriptors in all (§2.7.5.2: the driver MUST NOT create a
//!   longer one; an indirect table counts its entries) and at most 2^32 bytes (§2.7.5.2);
//! - every buffer is non-empty and lies wholly in RAM (not past its end, not in a hole);
//!   device-readable buffers come before device-writable ones (§2.7.5.2);
//! - an indirect descriptor only with the feature, never with NEXT, never inside an indirect
//!   table (§2.7.5.3.1), its table a non-empty whole number of descriptors, in RAM.
//!
//! Guest memory is reached through [`GuestRam`], so the module is tested on the host.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

/// Guest memory as the queue sees it.
pub trait GuestRam {
    /// Whether `[gpa, gpa + len)` lies wholly in RAM (no overflow, no hole, not past the end).
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
    /// Copies RAM at `gpa` into `buf`; `Err` if any of it is not RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam>;
    /// Copies `data` into RAM at `gpa`; `Err` (and nothing written) if any of it is not RAM.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam>;
    /// The host address of `[gpa, gpa + len)`, made usable (lazy RAM populated), for a device
    /// that another host CPU fills directly (virtio-net's posted receive buffers). The address
    /// stays valid while the VM's RAM lives; `None` if the range is not RAM or this RAM hands
    /// out no addresses (then the device copies through [`GuestRam::write`]).
    fn host_range(&self, _gpa: u64, _len: u64) -> Option<*mut u8> {
        None
    }
    /// Copies RAM at `gpa` straight to host memory at `dst` (`len` bytes): one copy, into a
    /// range [`GuestRam::host_range`] gave out. The default bounces through a small buffer.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    unsafe fn read_to(&self, gpa: u64, dst: *mut u8, len: usize) -> Result<(), NotRam> {
        if !self.is_ram(gpa, len as u64) {
            return Err(NotRam);
        }
        let mut bounce = [0u8; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(bounce.len());
            self.read(gpa + done as u64, &mut bounce[..n])?;
            // SAFETY: the caller promises `dst` is writable for `len` bytes; `done + n <= len`.
            unsafe { core::ptr::copy_nonoverlapping(bounce.as_ptr(), dst.add(done), n) };
            done += n;
        }
        Ok(())
    }
}

/// A reference to guest memory is guest memory (so `&dyn GuestRam` can be handed on).
impl<T: GuestRam + ?Sized> GuestRam for &T {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        (**self).is_ram(gpa, len)
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        (**self).read(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        (**self).write(gpa, data)
    }
    fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        (**self).host_range(gpa, len)
    }
    unsafe fn read_to(&self, gpa: u64, dst: *mut u8, len: usize) -> Result<(), NotRam> {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).read_to(gpa, dst, len) }
    }
}

/// An access that is not wholly in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotRam;

impl GuestRam for crate::vmm::guest_mem::GuestMemory {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.contains(gpa, len)
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        crate::vmm::guest_mem::GuestMemory::read(self, gpa, buf).map_err(|_| NotRam)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        crate::vmm::guest_mem::GuestMemory::write(self, gpa, data).map_err(|_| NotRam)
    }
    fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        crate::vmm::guest_mem::GuestMemory::host_range_of(self, gpa, len)
    }
    unsafe fn read_to(&self, gpa: u64, dst: *mut u8, len: usize) -> Result<(), NotRam> {
        // SAFETY: the caller's promise, passed on.
        unsafe { crate::vmm::guest_mem::GuestMemory::read_to(self, gpa, dst, len) }.map_err(|_| NotRam)
    }
}

/// The largest queue size (§2.7: Queue Size is at most 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Descriptor flags (§2.7.5).
/// The buffer continues in the descriptor named by `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of descriptors (§2.7.5.3).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Available ring flag (§2.7.7): the driver wants no used-buffer notifications (advisory;
/// only without VIRTIO_F_EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag (§2.7.10): the device wants no available-buffer notifications (advisory;
/// only without VIRTIO_F_EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// A descriptor table entry (§2.7.5): a guest-physical buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

const _: () = assert!(core::mem::size_of::<Descriptor>() == Descriptor::SIZE);

impl Descriptor {
    pub const SIZE: usize = 16;
    /// The descriptor table's alignment (§2.7).
    pub const ALIGN: u64 = 16;

    /// Decodes the little-endian bytes of a table entry.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = *b;
        Descriptor {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// The entry's little-endian bytes.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A used ring element (§2.7.8): the head of a returned chain and the bytes written to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

const _: () = assert!(core::mem::size_of::<UsedElem>() == UsedElem::SIZE);

impl UsedElem {
    pub const SIZE: usize = 8;

    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Available ring layout (§2.7.6): byte offsets.
pub mod avail {
    pub const FLAGS: u64 = 0;
    pub const IDX: u64 = 2;
    pub const RING: u64 = 4;
    pub const ALIGN: u64 = 2;
    /// Offset of `used_event` (only with VIRTIO_F_EVENT_IDX), after `size` ring entries.
    pub const fn used_event(size: u16) -> u64 {
        RING + 2 * size as u64
    }
    /// Bytes of the ring with `used_event`.
    pub const fn len(size: u16) -> u64 {
        used_event(size) + 2
    }
}

/// Used ring layout (§2.7.8): byte offsets.
pub mod used {
    pub const FLAGS: u64 = 0;
    pub const IDX: u64 = 2;
    pub const RING: u64 = 4;
    pub const ALIGN: u64 = 4;
    /// Offset of `avail_event` (only with VIRTIO_F_EVENT_IDX), after `size` elements.
    pub const fn avail_event(size: u16) -> u64 {
        RING + super::UsedElem::SIZE as u64 * size as u64
    }
    /// Bytes of the ring with `avail_event`.
    pub const fn len(size: u16) -> u64 {
        avail_event(size) + 2
    }
}

/// `vring_need_event` (§2.7.7.2, §2.7.10): whether moving an index from `old` to `new` crossed
/// `event` (the other side asked to hear once the index passes `event`). Wrapping u16 arithmetic.
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// What the driver wrote into the queue's configuration (virtio-pci common configuration:
/// queue_size, queue_desc, queue_driver, queue_device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The negotiated features that change how the queue works.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueFeatures {
    /// VIRTIO_F_INDIRECT_DESC.
    pub indirect: bool,
    /// VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
}

impl QueueFeatures {
    /// From the 64-bit negotiated feature word.
    pub fn from_bits(features: u64) -> Self {
        QueueFeatures {
            indirect: features & (1 << super::F_INDIRECT_DESC) != 0,
            event_idx: features & (1 << super::F_EVENT_IDX) != 0,
        }
    }
}

/// Which queue area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    Descriptors,
    Available,
    Used,
}

/// A driver error: the device must enter DEVICE_NEEDS_RESET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Queue size 0, not a power of two, or above [`MAX_QUEUE_SIZE`].
    BadSize(u16),
    /// A ring is not aligned as §2.7 requires.
    Misaligned(Area, u64),
    /// A ring does not lie wholly in RAM.
    AreaNotInRam(Area, u64),
    /// The available index moved `ahead` entries past the device's, more than the queue holds.
    AvailIndexJump { avail_idx: u16, next: u16 },
    /// A head index in the available ring is outside the descriptor table.
    HeadOutOfRange(u16),
    /// A head index the device has taken and not yet returned is made available again.
    HeadInFlight(u16),
    /// A `next` index is outside its (direct or indirect) descriptor table.
    NextOutOfRange { index: u16, table_len: u32 },
    /// A chain reaches a descriptor it has already visited.
    Loop(u16),
    /// A chain has more descriptors than the queue size.
    ChainTooLong { size: u16 },
    /// A chain's buffers add up to more than 2^32 bytes.
    ChainTooBig,
    /// A buffer of length 0.
    EmptyBuffer { addr: u64 },
    /// A buffer (or indirect table) not wholly in RAM.
    BufferNotInRam { addr: u64, len: u32 },
    /// A device-readable buffer after a device-writable one.
    ReadableAfterWritable,
    /// VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated.
    IndirectNotNegotiated,
    /// VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT.
    IndirectWithNext,
    /// VIRTQ_DESC_F_INDIRECT inside an indirect table.
    NestedIndirect,
    /// An indirect table whose length is 0 or not a multiple of 16.
    BadIndirectLength(u32),
    /// A used element for a head the queue never handed out (a device bug, not the driver's).
    BadUsedId(u16),
    /// Guest memory that was RAM a moment ago could not be accessed.
    Memory,
    /// A chain too short for its device's request framing (virtio-blk: a 16-byte header and
    /// a status byte, virtio 1.2 §5.2.6).
    Malformed { readable: u64, writable: u64 },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use QueueError::*;
        match *self {
            BadSize(s) => write!(f, "queue size {s} is not a power of two in 1..=32768"),
            Misaligned(a, gpa) => write!(f, "{a:?} ring at {gpa:#x} is misaligned"),
            AreaNotInRam(a, gpa) => write!(f, "{a:?} ring at {gpa:#x} is not in RAM"),
            AvailIndexJump { avail_idx, next } => {
                write!(f, "available index {avail_idx} is more than the queue size ahead of {next}")
            }
            HeadOutOfRange(h) => write!(f, "chain head {h} is outside the descriptor table"),
            HeadInFlight(h) => write!(f, "chain head {h} is made available again before it was used"),
            NextOutOfRange { index, table_len } => {
                write!(f, "next index {index} is outside a table of {table_len} descriptors")
            }
            Loop(i) => write!(f, "descriptor chain loops at descriptor {i}"),
            ChainTooLong { size } => write!(f, "descriptor chain is longer than the queue size {size}"),
            ChainTooBig => f.write_str("descriptor chain holds more than 4 GiB"),
            EmptyBuffer { addr } => write!(f, "zero-length buffer at {addr:#x}"),
            BufferNotInRam { addr, len } => write!(f, "buffer {addr:#x}+{len:#x} is not in RAM"),
            ReadableAfterWritable => f.write_str("device-readable buffer after a device-writable one"),
            IndirectNotNegotiated => f.write_str("indirect descriptor without VIRTIO_F_INDIRECT_DESC"),
            IndirectWithNext => f.write_str("indirect descriptor with VIRTQ_DESC_F_NEXT"),
            NestedIndirect => f.write_str("indirect descriptor inside an indirect table"),
            BadIndirectLength(l) => write!(f, "indirect table of {l} bytes (not a non-zero multiple of 16)"),
            BadUsedId(id) => write!(f, "used element for descriptor {id}, which is not a chain head in flight"),
            Memory => f.write_str("guest memory access failed"),
            Malformed { readable, writable } => write!(
                f,
                "request chain with {readable} readable and {writable} writable bytes is too short for its header and status"
            ),
        }
    }
}

/// One buffer of a chain, checked to lie in RAM and to be non-empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A validated descriptor chain: its head (to return in the used ring) and its buffers in
/// order, device-readable ones first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

impl Chain {
    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.buffers.iter().filter(|b| !b.writable).map(|b| u64::from(b.len)).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.buffers.iter().filter(|b| b.writable).map(|b| u64::from(b.len)).sum()
    }
}

/// A split virtqueue, device side.
#[derive(Clone, Debug)]
pub struct SplitQueue {
    config: QueueConfig,
    features: QueueFeatures,
    /// The next available ring entry to take (`last_avail_idx`).
    next_avail: u16,
    /// The next used ring entry to fill.
    next_used: u16,
    /// The used index when the driver was last notified (event index), or `None` before any
    /// notification decision (the first one is always made).
    signalled_used: Option<u16>,
    /// Chain heads handed out and not yet returned (one bit per descriptor).
    in_flight: Vec<u64>,
    /// Set by the first error; the queue is dead until rebuilt.
    broken: Option<QueueError>,
}

impl SplitQueue {
    /// A queue the driver has enabled with `config`; checks the size and that the three areas
    /// are aligned and lie in RAM.
    pub fn new(config: QueueConfig, features: QueueFeatures, mem: &impl GuestRam) -> Result<Self, QueueError> {
        let size = config.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::BadSize(size));
        }
        let areas = [
            (Area::Descriptors, config.desc, Descriptor::ALIGN, Descriptor::SIZE as u64 * u64::from(size)),
            (Area::Available, config.avail, avail::ALIGN, avail::len(size)),
            (Area::Used, config.used, used::ALIGN, used::len(size)),
        ];
        for (area, gpa, align, len) in areas {
            if !gpa.is_multiple_of(align) {
                return Err(QueueError::Misaligned(area, gpa));
            }
            if !mem.is_ram(gpa, len) {
                return Err(QueueError::AreaNotInRam(area, gpa));
            }
        }
        Ok(SplitQueue {
            config,
            features,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
            in_flight: alloc::vec![0; usize::from(size).div_ceil(64)],
            broken: None,
        })
    }

    pub fn size(&self) -> u16 {
        self.config.size
    }

    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// The error that broke the queue, if one did.
    pub fn broken(&self) -> Option<QueueError> {
        self.broken
    }

    /// Records `e` as the queue's error (the first one stays) and returns it.
    fn fail<T>(&mut self, e: QueueError) -> Result<T, QueueError> {
        Err(*self.broken.get_or_insert(e))
    }

    fn check(&self) -> Result<(), QueueError> {
        self.broken.map_or(Ok(()), Err)
    }

    fn read_u16(mem: &impl GuestRam, gpa: u64) -> Result<u16, QueueError> {
        let mut b = [0; 2];
        mem.read(gpa, &mut b).map_err(|_| QueueError::Memory)?;
        Ok(u16::from_le_bytes(b))
    }

    fn write_u16(mem: &impl GuestRam, gpa: u64, v: u16) -> Result<(), QueueError> {
        mem.write(gpa, &v.to_le_bytes()).map_err(|_| QueueError::Memory)
    }

    /// How many chains the driver has made available and the device not yet taken.
    pub fn pending(&mut self, mem: &impl GuestRam) -> Result<u16, QueueError> {
        self.check()?;
        let avail_idx = match Self::read_u16(mem, self.config.avail + avail::IDX) {
            Ok(i) => i,
            Err(e) => return self.fail(e),
        };
        let n = avail_idx.wrapping_sub(self.next_avail);
        if n > self.config.size {
            return self.fail(QueueError::AvailIndexJump { avail_idx, next: self.next_avail });
        }
        Ok(n)
    }

    /// Takes the next available chain, validated; `Ok(None)` if there is none.
    pub fn pop(&mut self, mem: &impl GuestRam) -> Result<Option<Chain>, QueueError> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        // The ring entry and the descriptors are read after the index (§2.7.13: the driver
        // writes them before it publishes the index).
        fence(Ordering::Acquire);
        let size = self.config.size;
        let slot = self.config.avail + avail::RING + 2 * u64::from(self.next_avail % size);
        let head = match Self::read_u16(mem, slot) {
            Ok(h) => h,
            Err(e) => return self.fail(e),
        };
        if head >= size {
            return self.fail(QueueError::HeadOutOfRange(head));
        }
        let (word, bit) = (usize::from(head) / 64, head % 64);
        if self.in_flight.get(word).is_some_and(|w| w & (1 << bit) != 0) {
            return self.fail(QueueError::HeadInFlight(head));
        }
        match self.walk(mem, head) {
            Ok(buffers) => {
                self.next_avail = self.next_avail.wrapping_add(1);
                if let Some(w) = self.in_flight.get_mut(word) {
                    *w |= 1 << bit;
                }
                Ok(Some(Chain { head, buffers }))
            }
            Err(e) => self.fail(e),
        }
    }

    /// Walks and validates the chain from `head` (see the module documentation).
    fn walk(&self, mem: &impl GuestRam, head: u16) -> Result<Vec<Buffer>, QueueError> {
        let size = self.config.size;
        let mut buffers = Vec::new();
        let mut visited = alloc::vec![0u64; usize::from(size).div_ceil(64)];
        let mut total: u64 = 0;
        let mut seen_writable = false;
        let mut push = |d: &Descriptor, buffers: &mut Vec<Buffer>| -> Result<(), QueueError> {
            if buffers.len() >= usize::from(size) {
                return Err(QueueError::ChainTooLong { size });
            }
            if d.len == 0 {
                return Err(QueueError::EmptyBuffer { addr: d.addr });
            }
            if !mem.is_ram(d.addr, u64::from(d.len)) {
                return Err(QueueError::BufferNotInRam { addr: d.addr, len: d.len });
            }
            let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
            if seen_writable && !writable {
                return Err(QueueError::ReadableAfterWritable);
            }
            seen_writable |= writable;
            total += u64::from(d.len);
            if total > 1 << 32 {
                return Err(QueueError::ChainTooBig);
            }
            buffers.push(Buffer { addr: d.addr, len: d.len, writable });
            Ok(())
        };

        let mut index = head;
        loop {
            let (word, bit) = (usize::from(index) / 64, index % 64);
            let seen = visited.get_mut(word).ok_or(QueueError::NextOutOfRange { index, table_len: size.into() })?;
            if *seen & (1 << bit) != 0 {
                return Err(QueueError::Loop(index));
            }
            *seen |= 1 << bit;
            let d = self.descriptor(mem, self.config.desc, index)?;
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.features.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                self.walk_indirect(mem, &d, &mut buffers, &mut push)?;
                return Ok(buffers);
            }
            push(&d, &mut buffers)?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(buffers);
            }
            if d.next >= size {
                return Err(QueueError::NextOutOfRange { index: d.next, table_len: size.into() });
            }
            index = d.next;
        }
    }

    /// Walks the indirect table `ind` refers to (§2.7.5.3): entries from 0, chained by `next`
    /// inside the table; its buffers go after those already in `buffers`.
    fn walk_indirect(
        &self,
        mem: &impl GuestRam,
        ind: &Descriptor,
        buffers: &mut Vec<Buffer>,
        push: &mut impl FnMut(&Descriptor, &mut Vec<Buffer>) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        let entry = Descriptor::SIZE as u32;
        if ind.len == 0 || !ind.len.is_multiple_of(entry) {
            return Err(QueueError::BadIndirectLength(ind.len));
        }
        if !mem.is_ram(ind.addr, u64::from(ind.len)) {
            return Err(QueueError::BufferNotInRam { addr: ind.addr, len: ind.len });
        }
        let table_len = ind.len / entry;
        // A table longer than the queue cannot hold a chain the queue accepts.
        if table_len > u32::from(self.config.size) {
            return Err(QueueError::ChainTooLong { size: self.config.size });
        }
        let mut visited = alloc::vec![0u64; (table_len as usize).div_ceil(64)];
        let mut index: u16 = 0;
        loop {
            let (word, bit) = (usize::from(index) / 64, index % 64);
            let seen = visited.get_mut(word).ok_or(QueueError::NextOutOfRange { index, table_len })?;
            if *seen & (1 << bit) != 0 {
                return Err(QueueError::Loop(index));
            }
            *seen |= 1 << bit;
            let d = self.descriptor(mem, ind.addr, index)?;
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::NestedIndirect);
            }
            push(&d, buffers)?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if u32::from(d.next) >= table_len {
                return Err(QueueError::NextOutOfRange { index: d.next, table_len });
            }
            index = d.next;
        }
    }

    /// Entry `index` of the descriptor table at `table` (whose bounds the caller checked).
    fn descriptor(&self, mem: &impl GuestRam, table: u64, index: u16) -> Result<Descriptor, QueueError> {
        let mut b = [0; Descriptor::SIZE];
        let gpa = table.checked_add(Descriptor::SIZE as u64 * u64::from(index)).ok_or(QueueError::Memory)?;
        mem.read(gpa, &mut b).map_err(|_| QueueError::Memory)?;
        Ok(Descriptor::from_bytes(&b))
    }

    /// Returns the chain `head` to the driver with `written` bytes written into its buffers.
    pub fn push_used(&mut self, mem: &impl GuestRam, head: u16, written: u32) -> Result<(), QueueError> {
        self.check()?;
        let (word, bit) = (usize::from(head) / 64, head % 64);
        match self.in_flight.get_mut(word) {
            Some(w) if *w & (1 << bit) != 0 => *w &= !(1 << bit),
            _ => return Err(QueueError::BadUsedId(head)),
        }
        let size = self.config.size;
        let slot = self.config.used + used::RING + UsedElem::SIZE as u64 * u64::from(self.next_used % size);
        let elem = UsedElem { id: head.into(), len: written };
        if mem.write(slot, &elem.to_bytes()).is_err() {
            return self.fail(QueueError::Memory);
        }
        // The element is visible before the index that publishes it (§2.7.8.2).
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        if let Err(e) = Self::write_u16(mem, self.config.used + used::IDX, self.next_used) {
            return self.fail(e);
        }
        Ok(())
    }

    /// Whether the driver wants a used-buffer notification (an interrupt) for what was pushed
    /// since the last call that returned `true` (§2.7.7): with VIRTIO_F_EVENT_IDX when the
    /// used index passed `used_event`; otherwise unless VIRTQ_AVAIL_F_NO_INTERRUPT is set.
    pub fn needs_notification(&mut self, mem: &impl GuestRam) -> Result<bool, QueueError> {
        self.check()?;
        // The used index is written before the driver's suppression field is read (§2.7.7.2).
        fence(Ordering::SeqCst);
        let new = self.next_used;
        if self.features.event_idx {
            let event = match Self::read_u16(mem, self.config.avail + avail::used_event(self.config.size)) {
                Ok(e) => e,
                Err(e) => return self.fail(e),
            };
            let old = self.signalled_used.replace(new);
            Ok(match old {
                Some(old) => need_event(event, new, old),
                None => true,
            })
        } else {
            let flags = match Self::read_u16(mem, self.config.avail + avail::FLAGS) {
                Ok(f) => f,
                Err(e) => return self.fail(e),
            };
            Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver for available-buffer notifications (kicks) again, after
    /// [`SplitQueue::disable_notifications`]: with VIRTIO_F_EVENT_IDX by setting `avail_event`
    /// to the next entry the device will take, otherwise by clearing VIRTQ_USED_F_NO_NOTIFY.
    /// Returns whether chains arrived meanwhile (the device must look at them: the driver may
    /// have decided not to kick before it saw the change, §2.7.10).
    pub fn enable_notifications(&mut self, mem: &impl GuestRam) -> Result<bool, QueueError> {
        self.check()?;
        let size = self.config.size;
        let r = if self.features.event_idx {
            Self::write_u16(mem, self.config.used + used::avail_event(size), self.next_avail)
        } else {
            Self::write_u16(mem, self.config.used + used::FLAGS, 0)
        };
        if let Err(e) = r {
            return self.fail(e);
        }
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? != 0)
    }

    /// Tells the driver that kicks are not needed while the device is busy with the queue
    /// (VIRTQ_USED_F_NO_NOTIFY; with VIRTIO_F_EVENT_IDX, `avail_event` already says when the
    /// next kick is due and is left alone).
    pub fn disable_notifications(&mut self, mem: &impl GuestRam) -> Result<(), QueueError> {
        self.check()?;
        if self.features.event_idx {
            return Ok(());
        }
        if let Err(e) = Self::write_u16(mem, self.config.used + used::FLAGS, VIRTQ_USED_F_NO_NOTIFY) {
            return self.fail(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
