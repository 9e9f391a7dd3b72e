//! A VM's guest-physical RAM: host frames mapped at guest-physical 0.. by nested page tables
//! (AMD NPT or Intel EPT, built by `mm::paging` with 2 MiB pages), plus checked access and
//! guest page-table walks.
//!
//! A guest reaches only what these tables map: every other guest-physical address exits
//! (NPF / EPT violation) and the core decides (`vmm::mmio`). Vireo reaches guest memory only
//! through the checked helpers here, which refuse anything outside `[0, size)`.

use core::fmt;

use crate::mm::{
    pool::TablePool, Ept, FrameAllocator, FrameError, MapError, MapFlags, Npt, PageSize, PageTables, LARGE_PAGE_SIZE,
    PAGE_SIZE,
};

/// Which nested paging format the backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedFormat {
    Npt,
    Ept,
}

enum Tables {
    Npt(PageTables<Npt>),
    Ept(PageTables<Ept>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// `[gpa, gpa + len)` is not inside guest RAM.
    OutOfRange {
        gpa: u64,
        len: u64,
    },
    Frames(FrameError),
    Map(MapError),
}

impl fmt::Display for GuestMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestMemError::OutOfRange { gpa, len } => {
                write!(f, "guest-physical {gpa:#x}+{len:#x} is outside guest RAM")
            }
            GuestMemError::Frames(e) => write!(f, "host memory: {e}"),
            GuestMemError::Map(e) => write!(f, "nested page tables: {e}"),
        }
    }
}

impl From<FrameError> for GuestMemError {
    fn from(e: FrameError) -> Self {
        GuestMemError::Frames(e)
    }
}

impl From<MapError> for GuestMemError {
    fn from(e: MapError) -> Self {
        GuestMemError::Map(e)
    }
}

pub struct GuestMemory {
    host_base: u64,
    size: u64,
    pool_base: u64,
    pool_count: usize,
    pool: TablePool,
    tables: Tables,
}

impl GuestMemory {
    /// Allocates `size` bytes (rounded up to 2 MiB) of zeroed host RAM and maps it at
    /// guest-physical 0 with write-back, read/write/execute 2 MiB pages.
    pub fn new(frames: &mut FrameAllocator, size: u64, format: NestedFormat) -> Result<Self, GuestMemError> {
        let size = size.div_ceil(LARGE_PAGE_SIZE).max(1) * LARGE_PAGE_SIZE;
        let host_base = frames.alloc(size, LARGE_PAGE_SIZE)?;
        // PML4 + PDPT + one directory per GiB, with slack.
        let pool_count = 4 + size.div_ceil(1 << 30) as usize;
        let pool_base = match frames.alloc(pool_count as u64 * PAGE_SIZE, PAGE_SIZE) {
            Ok(b) => b,
            Err(e) => {
                let _ = frames.free(host_base, size);
                return Err(e.into());
            }
        };
        // SAFETY: both ranges were just taken from the frame allocator (owned by this VM
        // until `release`) and Vireo identity-maps all RAM. Zeroing keeps host data (and
        // earlier VMs' data) out of the guest.
        let mut pool = unsafe {
            core::ptr::write_bytes(host_base as *mut u8, 0, size as usize);
            TablePool::identity(pool_base, pool_count)
        };
        let flags = MapFlags::READ | MapFlags::WRITE | MapFlags::EXECUTE;
        let tables = match format {
            NestedFormat::Npt => {
                let mut t = PageTables::<Npt>::new(&mut pool)?;
                t.map(&mut pool, 0, host_base, size, flags, PageSize::Size2M)?;
                Tables::Npt(t)
            }
            NestedFormat::Ept => {
                let mut t = PageTables::<Ept>::new(&mut pool)?;
                t.map(&mut pool, 0, host_base, size, flags, PageSize::Size2M)?;
                Tables::Ept(t)
            }
        };
        Ok(Self { host_base, size, pool_base, pool_count, pool, tables })
    }

    /// Returns the memory and tables to the frame allocator.
    pub fn release(self, frames: &mut FrameAllocator) {
        let _ = frames.free(self.host_base, self.size);
        let _ = frames.free(self.pool_base, self.pool_count as u64 * PAGE_SIZE);
    }

    /// Physical address of the NPT root (nCR3) or EPT PML4.
    pub fn nested_root(&self) -> u64 {
        match &self.tables {
            Tables::Npt(t) => t.root(),
            Tables::Ept(t) => t.root(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host-physical address backing guest-physical `gpa` (for reports).
    pub fn host_addr(&mut self, gpa: u64) -> Option<u64> {
        match &self.tables {
            Tables::Npt(t) => t.translate(&mut self.pool, gpa).map(|t| t.phys),
            Tables::Ept(t) => t.translate(&mut self.pool, gpa).map(|t| t.phys),
        }
    }

    /// Whether `[gpa, gpa + len)` lies in guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<*mut u8, GuestMemError> {
        if !self.contains(gpa, len as u64) {
            return Err(GuestMemError::OutOfRange { gpa, len: len as u64 });
        }
        Ok((self.host_base + gpa) as *mut u8)
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let src = self.check(gpa, buf.len())?;
        // SAFETY: `check` proved the range lies inside this VM's host allocation, which is
        // identity-mapped and owned by this VM for its whole life. Guest RAM is never
        // borrowed as a Rust reference, only copied through raw pointers: other vCPUs may
        // write it at the same time, as other CPUs or DMA do on real hardware (the guest
        // sees a torn copy at worst, never Vireo memory).
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let dst = self.check(gpa, data.len())?;
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, GuestMemError> {
        let mut b = [0; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), GuestMemError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Atomically replaces the byte at `gpa` (a flag byte the guest changes with locked
    /// instructions on other CPUs, such as KVM's `preempted`); returns the old value.
    pub fn swap_u8(&self, gpa: u64, value: u8) -> Result<u8, GuestMemError> {
        let p = self.check(gpa, 1)?;
        // SAFETY: `check` proved the byte lies inside this VM's RAM (see `read`). An atomic
        // reference to guest RAM is sound: every access Vireo makes to this byte is atomic
        // too, and the guest's own accesses are by another agent, as with hardware.
        let a = unsafe { &*(p as *const core::sync::atomic::AtomicU8) };
        Ok(a.swap(value, core::sync::atomic::Ordering::AcqRel))
    }

    /// Fills `[gpa, gpa + len)` with zeros.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
        let dst = self.check(gpa, len as usize)?;
        // SAFETY: as in `write`.
        unsafe { core::ptr::write_bytes(dst, 0, len as usize) };
        Ok(())
    }
}

// SAFETY: the RAM and table frames belong to this VM for its whole life and are reached only
// through the checked copies above (raw pointers, no references into guest RAM); the
// tables are changed only through `&mut self`.
unsafe impl Send for GuestMemory {}
// SAFETY: as for `Send`: shared access is the raw-pointer copies of `read`/`write`.
unsafe impl Sync for GuestMemory {}

#[cfg(test)]
impl GuestMemory {
    /// 2 MiB of NPT-mapped RAM from `frames` (see `FrameAllocator::for_tests`).
    pub fn for_tests(frames: &mut FrameAllocator) -> Self {
        Self::new(frames, 2 << 20, NestedFormat::Npt).unwrap()
    }
}

impl super::walk::PhysRead for GuestMemory {
    fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
        self.read_u64(gpa).ok()
    }
}
