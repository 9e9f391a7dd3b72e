//! Guest FPU/SSE/AVX state. Vireo itself is soft-float and never touches these registers,
//! so a guest's state stays live in the CPU across exits; it is saved and restored only
//! when another vCPU is put on this CPU (`FpuState::switch_to`), with XSAVE/XRSTOR where
//! the CPU has it (SDM Vol. 1 ch. 13) and FXSAVE/FXRSTOR otherwise.

use alloc::alloc::{alloc_zeroed, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::vmm::cpuid;

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;

/// XCR0 bits (SDM Vol. 1 §13.3).
pub const XCR0_X87: u64 = 1 << 0;
pub const XCR0_SSE: u64 = 1 << 1;
pub const XCR0_YMM: u64 = 1 << 2;
pub const XCR0_BNDREGS: u64 = 1 << 3;
pub const XCR0_BNDCSR: u64 = 1 << 4;
pub const XCR0_AVX512: u64 = 0b111 << 5;

/// XCR0 value the CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX), 0 without XSAVE.
static SUPPORTED_XCR0: AtomicU64 = AtomicU64::new(0);
/// Bytes of the save area for all supported components.
static AREA_SIZE: AtomicU64 = AtomicU64::new(512);

/// Enables FXSAVE/SSE and, where present, XSAVE for guests' use (host CR4 bits).
pub fn init() {
    let has_xsave = cpuid::host(1, 0).ecx & (1 << 26) != 0;
    // SAFETY: setting OSFXSR/OSXMMEXCPT (every x86-64 CPU has FXSR/SSE) and OSXSAVE only
    // when CPUID reports XSAVE; Vireo does not use these registers itself.
    unsafe {
        let mut cr4: u64;
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
        if has_xsave {
            cr4 |= CR4_OSXSAVE;
        }
        core::arch::asm!("mov cr4, {}", in(reg) cr4, options(nostack));
    }
    if has_xsave {
        let leaf = cpuid::host(0xD, 0);
        SUPPORTED_XCR0.store(((leaf.edx as u64) << 32) | leaf.eax as u64, Ordering::Relaxed);
        AREA_SIZE.store(leaf.ecx as u64, Ordering::Relaxed);
    }
}

pub fn supported_xcr0() -> u64 {
    SUPPORTED_XCR0.load(Ordering::Relaxed)
}

/// Whether a guest may load `value` into XCR0 (SDM Vol. 1 §13.3; XSETBV #GP conditions).
pub fn valid_xcr0(value: u64, supported: u64) -> bool {
    value & XCR0_X87 != 0
        && value & !supported == 0
        && (value & XCR0_YMM == 0 || value & XCR0_SSE != 0)
        && (value & XCR0_BNDREGS == 0) == (value & XCR0_BNDCSR == 0)
        && (value & XCR0_AVX512 == 0 || (value & XCR0_AVX512 == XCR0_AVX512 && value & XCR0_YMM != 0))
}

/// Loads XCR0.
///
/// # Safety
/// `value` must be valid for this CPU (see [`valid_xcr0`]) and CR4.OSXSAVE set.
pub unsafe fn xsetbv(value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
    };
}

/// One vCPU's FPU/SSE/AVX state and XCR0.
pub struct FpuState {
    area: *mut u8,
    /// The area's layout, for freeing it.
    layout: Layout,
    pub xcr0: u64,
}

impl Drop for FpuState {
    fn drop(&mut self) {
        // SAFETY: `area` was allocated in `new` with exactly this layout and is freed once.
        unsafe { alloc::alloc::dealloc(self.area, self.layout) };
    }
}

// SAFETY: the area is owned by this state alone (allocated in `new`, never shared).
unsafe impl Send for FpuState {}

impl FpuState {
    /// The architectural initial state (FNINIT/after reset: FCW 0x37F, MXCSR 0x1F80,
    /// XCR0 = x87 only).
    pub fn new() -> Option<Self> {
        let size = AREA_SIZE.load(Ordering::Relaxed).max(576) as usize;
        let layout = Layout::from_size_align(size, 64).ok()?;
        // SAFETY: non-zero size, valid alignment.
        let area = unsafe { alloc_zeroed(layout) };
        if area.is_null() {
            return None;
        }
        // Legacy area: FCW at 0, MXCSR at 24 (SDM Vol. 1 Table 10-2); a zero XSAVE header
        // (XSTATE_BV = 0) makes XRSTOR load every component's initial state.
        // SAFETY: the area has at least 576 bytes.
        unsafe {
            area.cast::<u16>().write(0x37F);
            area.add(24).cast::<u32>().write(0x1F80);
        }
        Some(Self { area, layout, xcr0: XCR0_X87 })
    }

    /// Saves the current registers into this state (call for the vCPU leaving the CPU).
    pub fn save(&mut self) {
        let all = supported_xcr0();
        // SAFETY: the area is 64-byte aligned and large enough for every supported
        // component; XCR0 is widened first so no component of the outgoing guest is
        // skipped, then its own value stays recorded in `self.xcr0`.
        unsafe {
            if all != 0 {
                xsetbv(all);
                core::arch::asm!("xsave64 [{}]", in(reg) self.area, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
            } else {
                core::arch::asm!("fxsave64 [{}]", in(reg) self.area, options(nostack));
            }
        }
    }

    /// Loads this state into the registers (call for the vCPU entering the CPU). Every
    /// component is loaded (initial values where this vCPU has none), so nothing of an
    /// earlier guest stays visible.
    pub fn restore(&self) {
        let all = supported_xcr0();
        // SAFETY: as in `save`; the area holds a valid image (initial or saved); the guest's
        // own XCR0 was validated when it was set.
        unsafe {
            if all != 0 {
                xsetbv(all);
                core::arch::asm!("xrstor64 [{}]", in(reg) self.area, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
                xsetbv(self.xcr0);
            } else {
                core::arch::asm!("fxrstor64 [{}]", in(reg) self.area, options(nostack));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcr0_rules() {
        let sup = XCR0_X87 | XCR0_SSE | XCR0_YMM | XCR0_AVX512;
        assert!(valid_xcr0(XCR0_X87, sup));
        assert!(valid_xcr0(XCR0_X87 | XCR0_SSE | XCR0_YMM, sup));
        assert!(!valid_xcr0(XCR0_SSE, sup), "x87 is mandatory");
        assert!(!valid_xcr0(XCR0_X87 | XCR0_YMM, sup), "YMM needs SSE");
        assert!(!valid_xcr0(XCR0_X87 | XCR0_SSE | XCR0_YMM | (1 << 5), sup), "AVX-512 all or nothing");
        assert!(valid_xcr0(XCR0_X87 | XCR0_SSE | XCR0_YMM | XCR0_AVX512, sup));
        assert!(!valid_xcr0(XCR0_X87 | XCR0_SSE | XCR0_AVX512, sup), "AVX-512 needs YMM");
        assert!(!valid_xcr0(XCR0_X87 | XCR0_BNDREGS, XCR0_X87 | XCR0_BNDREGS | XCR0_BNDCSR));
        assert!(!valid_xcr0(XCR0_X87 | (1 << 9), sup), "unsupported bit");
    }
}
