//! A validated chain as two byte streams: what the device may read (the device-readable
//! buffers, in order) and what it may write (the device-writable ones). virtio 1.x devices
//! must not assume any framing of a request over descriptors (virtio 1.2 §2.7.4, "Message
//! Framing"): a virtio-blk header may share a buffer with data, a status byte may end a data
//! buffer. Devices therefore address a request by offset into these streams.
//!
//! The buffers of a [`Chain`] were checked by [`super::queue::SplitQueue::pop`] to lie in RAM;
//! an access that fails anyway (the RAM went away) is [`QueueError::Memory`].

use super::queue::{Buffer, Chain, GuestRam, QueueError};

/// The buffers of `chain` that are device-writable (`true`) or device-readable (`false`).
fn buffers(chain: &Chain, writable: bool) -> impl Iterator<Item = &Buffer> {
    chain.buffers.iter().filter(move |b| b.writable == writable)
}

/// Calls `f(gpa, range in the caller's slice)` for each piece of the stream
/// `[offset, offset + len)`; returns how many bytes the stream held of it.
fn walk(
    chain: &Chain,
    writable: bool,
    offset: u64,
    len: usize,
    mut f: impl FnMut(u64, core::ops::Range<usize>) -> Result<(), QueueError>,
) -> Result<usize, QueueError> {
    let mut skip = offset;
    let mut done = 0usize;
    for b in buffers(chain, writable) {
        if done == len {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let n = usize::try_from(blen - skip).unwrap_or(usize::MAX).min(len - done);
        f(b.addr + skip, done..done + n)?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// Copies device-readable bytes from stream offset `offset` into `buf`; returns how many
/// there were (fewer than `buf.len()` when the stream ends first).
pub fn read(chain: &Chain, mem: &(impl GuestRam + ?Sized), offset: u64, buf: &mut [u8]) -> Result<usize, QueueError> {
    let len = buf.len();
    walk(chain, false, offset, len, |gpa, r| mem.read(gpa, &mut buf[r]).map_err(|_| QueueError::Memory))
}

/// Copies device-readable bytes from stream offset `offset` straight to host memory at `dst`
/// (`len` bytes: the one copy between two VMs); returns how many there were.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
pub unsafe fn read_to(
    chain: &Chain,
    mem: &(impl GuestRam + ?Sized),
    offset: u64,
    dst: *mut u8,
    len: usize,
) -> Result<usize, QueueError> {
    walk(chain, false, offset, len, |gpa, r| {
        // SAFETY: `r` lies within `[0, len)`, which the caller promises is writable at `dst`.
        unsafe { mem.read_to(gpa, dst.add(r.start), r.len()) }.map_err(|_| QueueError::Memory)
    })
}

/// Copies `data` into the device-writable stream at `offset`; returns how many bytes fitted.
pub fn write(chain: &Chain, mem: &(impl GuestRam + ?Sized), offset: u64, data: &[u8]) -> Result<usize, QueueError> {
    walk(chain, true, offset, data.len(), |gpa, r| mem.write(gpa, &data[r]).map_err(|_| QueueError::Memory))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::queue::NotRam;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    /// Flat test RAM `[0, len)`.
    pub(crate) struct FlatRam(pub RefCell<Vec<u8>>);

    impl FlatRam {
        pub(crate) fn new(len: usize) -> Self {
            FlatRam(RefCell::new(vec![0; len]))
        }

        pub(crate) fn put(&self, gpa: u64, data: &[u8]) {
            self.write(gpa, data).expect("test RAM");
        }

        pub(crate) fn u16_at(&self, gpa: u64) -> u16 {
            let mut b = [0; 2];
            self.read(gpa, &mut b).expect("test RAM");
            u16::from_le_bytes(b)
        }
    }

    impl GuestRam for FlatRam {
        fn is_ram(&self, gpa: u64, len: u64) -> bool {
            gpa.checked_add(len).is_some_and(|end| end <= self.0.borrow().len() as u64)
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
            if !self.is_ram(gpa, buf.len() as u64) {
                return Err(NotRam);
            }
            buf.copy_from_slice(&self.0.borrow()[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
            if !self.is_ram(gpa, data.len() as u64) {
                return Err(NotRam);
            }
            self.0.borrow_mut()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
            if !self.is_ram(gpa, len) {
                return None;
            }
            // SAFETY: the Vec is never resized after `new`, so its buffer stays put while the
            // RAM lives; the pointer is only used for raw copies.
            Some(unsafe { (*self.0.as_ptr()).as_mut_ptr().add(gpa as usize) })
        }
    }

    pub(crate) fn chain(bufs: &[(u64, u32, bool)]) -> Chain {
        Chain { head: 0, buffers: bufs.iter().map(|&(addr, len, writable)| Buffer { addr, len, writable }).collect() }
    }

    #[test]
    fn streams_cross_buffer_boundaries_and_skip_the_other_direction() {
        let mem = FlatRam::new(0x1000);
        for (i, b) in mem.0.borrow_mut().iter_mut().enumerate() {
            *b = i as u8;
        }
        // readable: 0x100+3, 0x200+5; writable: 0x300+4, 0x400+4
        let c = chain(&[(0x100, 3, false), (0x200, 5, false), (0x300, 4, true), (0x400, 4, true)]);
        let mut buf = [0u8; 6];
        assert_eq!(read(&c, &mem, 1, &mut buf).unwrap(), 6);
        assert_eq!(buf, [0x01, 0x02, 0x00, 0x01, 0x02, 0x03]);
        let mut big = [0u8; 16];
        assert_eq!(read(&c, &mem, 6, &mut big).unwrap(), 2, "the stream ends after 8 bytes");
        assert_eq!(read(&c, &mem, 100, &mut big).unwrap(), 0);

        assert_eq!(write(&c, &mem, 2, &[0xAA; 5]).unwrap(), 5);
        let m = mem.0.borrow();
        assert_eq!(&m[0x300..0x304], &[0x00, 0x01, 0xAA, 0xAA]);
        assert_eq!(&m[0x400..0x404], &[0xAA, 0xAA, 0xAA, 0x03]);
        assert_eq!(&m[0x100..0x103], &[0x00, 0x01, 0x02], "readable buffers untouched");
    }

    #[test]
    fn a_buffer_that_left_ram_is_a_memory_error() {
        let mem = FlatRam::new(0x100);
        let c = chain(&[(0x80, 0x100, true)]);
        assert_eq!(write(&c, &mem, 0x7E, &[1; 4]), Err(QueueError::Memory));
    }
}
