//! A contiguous pool of page-table frames: the [`PageTableMemory`] behind Vireo's own page
//! tables now, and behind each VM's NPT/EPT next.
//!
//! The pool hands out only its own frames and resolves only addresses inside itself, so
//! `table()` can never turn an arbitrary physical address into a writable reference.

use super::{paging::Table, MapError, PageTableMemory, PAGE_SIZE};

pub struct TablePool {
    phys_base: u64,
    virt_base: *mut Table,
    count: usize,
    used: usize,
}

impl TablePool {
    /// A pool of `count` tables whose first frame has physical address `phys_base` and is
    /// reachable at `virt_base`.
    ///
    /// # Safety
    /// `virt_base` must point to `count` writable, page-aligned tables owned by the pool for
    /// its whole life; `phys_base` must be page-aligned.
    pub unsafe fn new(phys_base: u64, virt_base: *mut Table, count: usize) -> Self {
        Self { phys_base, virt_base, count, used: 0 }
    }

    /// A pool over identity-mapped frames (physical address = virtual address).
    ///
    /// # Safety
    /// `[phys_base, phys_base + count * 4 KiB)` must be mapped identity, writable, and owned
    /// by the pool for its whole life.
    pub unsafe fn identity(phys_base: u64, count: usize) -> Self {
        // SAFETY: forwarded to the caller.
        unsafe { Self::new(phys_base, phys_base as *mut Table, count) }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn capacity(&self) -> usize {
        self.count
    }

    fn index(&self, phys: u64) -> Option<usize> {
        let offset = phys.checked_sub(self.phys_base)?;
        let index = (offset / PAGE_SIZE) as usize;
        (offset % PAGE_SIZE == 0 && index < self.used).then_some(index)
    }
}

impl PageTableMemory for TablePool {
    fn alloc_table(&mut self) -> Result<u64, MapError> {
        if self.used == self.count {
            return Err(MapError::OutOfMemory);
        }
        let phys = self.phys_base + self.used as u64 * PAGE_SIZE;
        self.used += 1;
        Ok(phys)
    }

    /// Resolves a table this pool handed out.
    ///
    /// The paging code only asks for addresses it wrote into entries of tables from this
    /// pool; any other address is a bug in Vireo, not bad input, so it stops Vireo.
    fn table(&mut self, phys: u64) -> &mut Table {
        let Some(index) = self.index(phys) else {
            panic!("page-table pool: {phys:#x} is not a table of this pool");
        };
        // SAFETY: `index < used <= count`, so the table lies inside the region the pool
        // owns (contract of `new`); `&mut self` makes this the only live reference.
        unsafe { &mut *self.virt_base.add(index) }
    }
}
