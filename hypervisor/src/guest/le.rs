//! Little-endian field writers for the binary structures Vireo builds in guest memory
//! (ACPI tables, the Linux zero page): each builder says how bytes land; the typed puts
//! are shared.

/// A buffer that takes bytes at offsets.
pub trait PutLe {
    /// Writes `bytes` at `off` (each builder decides what an out-of-range write does).
    fn put(&mut self, off: usize, bytes: &[u8]);

    fn put_u8(&mut self, off: usize, v: u8) {
        self.put(off, &[v]);
    }

    fn put_u16(&mut self, off: usize, v: u16) {
        self.put(off, &v.to_le_bytes());
    }

    fn put_u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_le_bytes());
    }

    fn put_u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_le_bytes());
    }
}
