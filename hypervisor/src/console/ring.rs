//! A bounded byte ring with one producer and one consumer at a time, without a lock of its
//! own: Vireo's console output waits here for the CPU that writes it to the UART
//! (`console::serial`).
//!
//! The producer (whoever holds the console's line lock) copies bytes in and then publishes
//! them by advancing `tail`; the consumer (whoever holds the UART's lock) reads published
//! bytes in place and then frees them by advancing `head`. Each index is written by one
//! side only, so the two sides never touch the same bytes: the producer writes only
//! `[tail, head + N)`, the consumer reads only `[head, tail)`.
//!
//! Both indices run freely (wrapping `usize`); `tail - head` is the number of bytes held
//! and a byte's slot is its index modulo `N` (a power of two). Both indices are stored and
//! loaded with `SeqCst`: the console's idle drainer pairs "the ring is non-empty" with "the
//! drainer is halted" Dekker-style (`console::serial`), which needs the two stores and the
//! two loads in one total order.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

pub struct ByteRing<const N: usize> {
    buf: UnsafeCell<[u8; N]>,
    /// Index of the oldest byte held; written by the consumer only.
    head: AtomicUsize,
    /// Index one past the newest byte published; written by the producer only.
    tail: AtomicUsize,
}

// SAFETY: the bytes are shared between one producer and one consumer that touch disjoint
// slots (see the module comment); the callers of `push` and `consume` promise that at most
// one of each runs at a time.
unsafe impl<const N: usize> Sync for ByteRing<N> {}

impl<const N: usize> Default for ByteRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> ByteRing<N> {
    const POWER_OF_TWO: () = assert!(N.is_power_of_two(), "the ring's size must be a power of two");

    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::POWER_OF_TWO;
        Self { buf: UnsafeCell::new([0; N]), head: AtomicUsize::new(0), tail: AtomicUsize::new(0) }
    }

    /// Bytes held (published and not yet consumed).
    pub fn len(&self) -> usize {
        self.tail.load(SeqCst).wrapping_sub(self.head.load(SeqCst))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub const fn capacity(&self) -> usize {
        N
    }

    /// Copies as many of `bytes` as fit, in order, and publishes them; returns how many.
    ///
    /// # Safety
    /// No other `push` runs at the same time (the caller is the only producer).
    pub unsafe fn push(&self, bytes: &[u8]) -> usize {
        let tail = self.tail.load(SeqCst);
        let free = N - tail.wrapping_sub(self.head.load(SeqCst));
        let n = bytes.len().min(free);
        if n == 0 {
            return 0;
        }
        let at = tail % N;
        let first = n.min(N - at);
        let buf = self.buf.get().cast::<u8>();
        // SAFETY: slots [tail, tail + n) are free (n <= N - held): the consumer reads only
        // below `tail`, and no other producer runs (the caller's promise). `at + first <= N`
        // and `n - first <= at`, so both copies stay inside the buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.add(at), first);
            core::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), buf, n - first);
        }
        self.tail.store(tail.wrapping_add(n), SeqCst);
        n
    }

    /// Hands the oldest published bytes (at most `max`, one contiguous piece: up to the end
    /// of the buffer) to `f`, then frees them; returns how many (0: the ring was empty).
    ///
    /// # Safety
    /// No other `consume` runs at the same time (the caller is the only consumer).
    pub unsafe fn consume(&self, max: usize, f: impl FnOnce(&[u8])) -> usize {
        let head = self.head.load(SeqCst);
        let held = self.tail.load(SeqCst).wrapping_sub(head);
        let at = head % N;
        let n = held.min(N - at).min(max);
        if n == 0 {
            return 0;
        }
        // SAFETY: slots [head, head + n) are published (n <= held) and the producer does not
        // write them until `head` moves past them, below; `at + n <= N`.
        let bytes = unsafe { core::slice::from_raw_parts(self.buf.get().cast::<u8>().add(at), n) };
        f(bytes);
        self.head.store(head.wrapping_add(n), SeqCst);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all<const N: usize>(r: &ByteRing<N>) -> Vec<u8> {
        let mut out = Vec::new();
        // SAFETY: one thread, so one consumer.
        while unsafe { r.consume(usize::MAX, |b| out.extend_from_slice(b)) } > 0 {}
        out
    }

    #[test]
    fn order_and_empty() {
        let r = ByteRing::<16>::new();
        assert!(r.is_empty());
        // SAFETY (all pushes here): one thread, so one producer.
        assert_eq!(unsafe { r.push(b"abc") }, 3);
        assert_eq!(unsafe { r.push(b"de") }, 2);
        assert_eq!(r.len(), 5);
        assert_eq!(take_all(&r), b"abcde");
        assert!(r.is_empty());
        // SAFETY: one consumer.
        assert_eq!(unsafe { r.consume(8, |_| panic!("nothing to consume")) }, 0);
    }

    #[test]
    fn full_ring_takes_what_fits() {
        let r = ByteRing::<8>::new();
        assert_eq!(unsafe { r.push(b"0123456789") }, 8);
        assert_eq!(r.len(), 8);
        assert_eq!(unsafe { r.push(b"x") }, 0, "a full ring takes nothing");
        // Freeing three bytes makes room for three.
        // SAFETY: one consumer.
        assert_eq!(unsafe { r.consume(3, |b| assert_eq!(b, b"012")) }, 3);
        assert_eq!(unsafe { r.push(b"abcdef") }, 3);
        assert_eq!(take_all(&r), b"34567abc");
    }

    #[test]
    fn wrap_around() {
        let r = ByteRing::<8>::new();
        let mut want = Vec::new();
        let mut got = Vec::new();
        // Pushes of varying length move the indices round the buffer many times; a push
        // that straddles the end is split in two, a consume stops at the end.
        for i in 0..200u32 {
            let chunk: Vec<u8> = (0..(i % 7) as u8).map(|k| (i as u8).wrapping_mul(31).wrapping_add(k)).collect();
            let n = unsafe { r.push(&chunk) };
            want.extend_from_slice(&chunk[..n]);
            if i % 3 == 0 {
                got.extend(take_all(&r));
            } else {
                // SAFETY: one consumer.
                unsafe { r.consume(2, |b| got.extend_from_slice(b)) };
            }
        }
        got.extend(take_all(&r));
        assert_eq!(got, want);
        // Wrapping of the free-running indices themselves.
        let r = ByteRing::<4> {
            buf: UnsafeCell::new([0; 4]),
            head: AtomicUsize::new(usize::MAX - 1),
            tail: AtomicUsize::new(usize::MAX - 1),
        };
        assert_eq!(unsafe { r.push(b"wxyz") }, 4);
        assert_eq!(r.len(), 4);
        assert_eq!(take_all(&r), b"wxyz");
    }

    #[test]
    fn one_producer_one_consumer_threads() {
        use std::sync::Arc;
        let r = Arc::new(ByteRing::<64>::new());
        let total = 100_000usize;
        let producer = {
            let r = r.clone();
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
                let mut at = 0;
                while at < total {
                    let end = (at + 13).min(total);
                    // SAFETY: this thread is the only producer.
                    at += unsafe { r.push(&data[at..end]) };
                    std::thread::yield_now();
                }
            })
        };
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            // SAFETY: this thread is the only consumer.
            unsafe { r.consume(17, |b| got.extend_from_slice(b)) };
        }
        producer.join().unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "bytes out of order");
        assert!(r.is_empty());
    }
}
