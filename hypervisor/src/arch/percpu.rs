//! Per-CPU data, reached through GS: IA32_GS_BASE points at this CPU's [`PerCpu`] block,
//! whose first quadword is its own address, so `mov rax, gs:[0]` finds it (SDM Vol. 3A
//! §3.4.4 "Segment Loading Instructions in IA-32e Mode": in 64-bit mode the GS base comes
//! from IA32_GS_BASE).
//!
//! Vireo never executes SWAPGS: IA32_KERNEL_GS_BASE belongs to the guests (VMX switches it
//! by hand, `vmx::percpu::SWAPPED_MSRS`; SVM with VMLOAD/VMSAVE). IA32_GS_BASE itself comes
//! back on every exit: VMX loads it from the VMCS host-state field HOST_GS_BASE (SDM Vol. 3C
//! §28.5.2), which `vmx::vcpu` fills from this CPU's MSR; SVM's world switch VMSAVEs the
//! host's GS base to this CPU's host-state page before VMLOADing the guest's and VMLOADs it
//! back after #VMEXIT (APM Vol. 2 §15.5.2), with GIF = 0 in between, so no interrupt or NMI
//! sees the guest's value.
//!
//! The BSP's block is a static (it is needed before there is a frame allocator); each AP's
//! block, IST stacks and kernel stack come from the frame allocator ([`alloc_ap`]).

use core::{
    cell::UnsafeCell,
    mem::MaybeUninit,
    sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering},
};

use x86_64::structures::{gdt::GlobalDescriptorTable, tss::TaskStateSegment};

use super::gdt::{self, IstStacks, IST_COUNT, IST_STACK_SIZE};
use crate::mm::{FrameAllocator, FrameError, PAGE_SIZE};

/// Most CPUs Vireo uses (the `cpus=` command-line key's upper bound).
pub const MAX_CPUS: usize = 256;
/// Size of an AP's kernel stack.
pub const AP_STACK_SIZE: u64 = 64 * 1024;
/// Bytes at the bottom of an AP's kernel stack that must stay zero ([`PerCpu::stack_canary_hit`]).
pub const STACK_CANARY_BYTES: u64 = 256;
/// IA32_GS_BASE (SDM Vol. 4 Table 2-2).
const IA32_GS_BASE: u32 = 0xC000_0101;

/// Bring-up states of a CPU ([`PerCpu::state`]).
pub const STATE_BOOTING: u8 = 0;
/// The AP reached Rust code on its own stack with its GDT, TSS, IDT and GS loaded.
pub const STATE_ALIVE: u8 = 1;
/// The CPU finished its initialization (FPU, local APIC, VMX/SVM) and is usable.
pub const STATE_ONLINE: u8 = 2;

/// What virtualization a CPU has switched on ([`PerCpu::virt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virt {
    None,
    Svm,
    Vmx,
}

impl Virt {
    pub fn name(self) -> &'static str {
        match self {
            Virt::None => "none",
            Virt::Svm => "svm",
            Virt::Vmx => "vmx",
        }
    }
}

/// One CPU's private data. Fields other CPUs may read are atomics.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Offset 0: this block's own address (what `gs:[0]` reads).
    self_ptr: u64,
    index: usize,
    apic_id: AtomicU32,
    state: AtomicU8,
    virt: AtomicU8,
    /// What this CPU is doing, for crash dumps (`idt::set_context`); null = nothing said.
    context: AtomicPtr<&'static str>,
    /// SVM: this CPU's VM_HSAVE_PA page and VMSAVE/VMLOAD host-state page (0 = not enabled).
    svm_hsave: AtomicU64,
    svm_host_save: AtomicU64,
    /// Wake-up IPIs this CPU took (`lapic::WAKE_VECTOR`).
    wakes: AtomicU64,
    /// Base of this CPU's [`IST_COUNT`] IST stacks.
    ist_base: u64,
    /// This CPU's kernel stack [low, high).
    stack: (u64, u64),
    tss: TaskStateSegment,
    gdt: GlobalDescriptorTable,
}
const _: () = assert!(core::mem::offset_of!(PerCpu, self_ptr) == 0);
const _: () = assert!(core::mem::size_of::<PerCpu>() <= PAGE_SIZE as usize);

impl PerCpu {
    /// Dense CPU index: 0 = the BSP, then the APs in the order they were started.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    pub fn set_apic_id(&self, id: u32) {
        self.apic_id.store(id, Ordering::Relaxed);
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    pub fn set_state(&self, state: u8) {
        self.state.store(state, Ordering::Release);
    }

    pub fn virt(&self) -> Virt {
        match self.virt.load(Ordering::Acquire) {
            1 => Virt::Svm,
            2 => Virt::Vmx,
            _ => Virt::None,
        }
    }

    pub fn set_virt(&self, virt: Virt) {
        let v = match virt {
            Virt::None => 0,
            Virt::Svm => 1,
            Virt::Vmx => 2,
        };
        self.virt.store(v, Ordering::Release);
    }

    pub fn context(&self) -> Option<&'static str> {
        let p = self.context.load(Ordering::Relaxed);
        // SAFETY: `context` only ever holds null or a `&'static &'static str` (set_context).
        (!p.is_null()).then(|| unsafe { *p })
    }

    pub fn set_context(&self, context: &'static &'static str) {
        self.context.store(context as *const _ as *mut _, Ordering::Relaxed);
    }

    pub fn svm_hsave(&self) -> u64 {
        self.svm_hsave.load(Ordering::Acquire)
    }

    pub fn svm_host_save(&self) -> u64 {
        self.svm_host_save.load(Ordering::Acquire)
    }

    pub fn set_svm_pages(&self, hsave: u64, host_save: u64) {
        self.svm_hsave.store(hsave, Ordering::Release);
        self.svm_host_save.store(host_save, Ordering::Release);
    }

    /// Wake-up IPIs this CPU has taken.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Acquire)
    }

    pub fn note_wake(&self) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
    }

    pub fn ist_base(&self) -> u64 {
        self.ist_base
    }

    /// This CPU's kernel stack [low, high).
    pub fn stack(&self) -> (u64, u64) {
        self.stack
    }

    /// Whether the lowest [`STACK_CANARY_BYTES`] of an AP's kernel stack were written: the
    /// stack came that close to the IST stacks below it (APs have no guard page; their area
    /// is zeroed when it is allocated). Always false on the BSP, whose boot stack has a guard
    /// page (`mm::host`).
    pub fn stack_canary_hit(&self) -> bool {
        if self.index == 0 || self.stack.0 == 0 {
            return false;
        }
        (0..STACK_CANARY_BYTES / 8).any(|i| {
            // SAFETY: the canary lies in this CPU's stack area, identity-mapped and never
            // freed (`alloc_ap`); a volatile read of another CPU's stack is a plain load.
            unsafe { core::ptr::read_volatile((self.stack.0 + 8 * i) as *const u64) != 0 }
        })
    }

    /// The deepest an AP's kernel stack has been, in bytes: from its top down to its lowest
    /// nonzero quadword (a lower bound: zeroes written at the bottom go unseen). `None` on
    /// the BSP.
    pub fn stack_peak(&self) -> Option<u64> {
        if self.index == 0 || self.stack.0 == 0 {
            return None;
        }
        let (lo, hi) = self.stack;
        let lowest = (lo..hi).step_by(8).find(|&a| {
            // SAFETY: as in `stack_canary_hit`.
            unsafe { core::ptr::read_volatile(a as *const u64) != 0 }
        });
        Some(lowest.map_or(0, |a| hi - a))
    }

    /// Builds a block in place at `p` and returns it.
    ///
    /// # Safety
    /// `p` must be valid for writes of a `PerCpu`, aligned, never freed and not referenced
    /// by anything else; the IST stacks at `ist_base` and the stack must belong to this CPU.
    unsafe fn init_at(p: *mut PerCpu, index: usize, apic_id: u32, ist_base: u64, stack: (u64, u64)) -> &'static Self {
        // SAFETY: per the contract `p` is ours; the GDT is filled in after the TSS has its
        // final address, through a raw pointer to a field disjoint from `tss`.
        unsafe {
            p.write(PerCpu {
                self_ptr: p as u64,
                index,
                apic_id: AtomicU32::new(apic_id),
                state: AtomicU8::new(STATE_BOOTING),
                virt: AtomicU8::new(0),
                context: AtomicPtr::new(core::ptr::null_mut()),
                svm_hsave: AtomicU64::new(0),
                svm_host_save: AtomicU64::new(0),
                wakes: AtomicU64::new(0),
                ist_base,
                stack,
                tss: gdt::new_tss(ist_base),
                gdt: GlobalDescriptorTable::new(),
            });
            let tss: &'static TaskStateSegment = &*core::ptr::addr_of!((*p).tss);
            core::ptr::addr_of_mut!((*p).gdt).write(gdt::new_gdt(tss));
            &*p
        }
    }
}

/// Registered CPUs by index.
static CPUS: [AtomicPtr<PerCpu>; MAX_CPUS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Set once the BSP's GS base points at its block (APs set theirs before running Rust).
static GS_READY: AtomicBool = AtomicBool::new(false);

/// The CPU with dense index `index`, if it was registered (check [`PerCpu::state`]).
pub fn get(index: usize) -> Option<&'static PerCpu> {
    let p = CPUS.get(index)?.load(Ordering::Acquire);
    // SAFETY: CPUS only holds pointers to blocks that live forever (`init_at`).
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Number of CPUs registered (the BSP and every AP Vireo tried to start).
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire)
}

/// The online CPUs in index order (index 0, the BSP, first; indices are dense: an AP
/// that failed to start gives its index to the next one unless it ran Vireo code).
pub fn online() -> impl Iterator<Item = &'static PerCpu> {
    (0..count()).filter_map(get).filter(|c| c.state() == STATE_ONLINE)
}

fn register(cpu: &'static PerCpu) {
    CPUS[cpu.index].store(cpu as *const _ as *mut _, Ordering::Release);
    COUNT.fetch_max(cpu.index + 1, Ordering::AcqRel);
}

/// This CPU's block, once [`init_bsp`] ran (on APs, from their first Rust instruction).
#[cfg(target_os = "none")]
#[inline]
pub fn try_current() -> Option<&'static PerCpu> {
    if !GS_READY.load(Ordering::Acquire) {
        return None;
    }
    let p: u64;
    // SAFETY: GS base holds this CPU's PerCpu address (BSP: init_bsp; APs: activate before
    // any other Rust code), whose first quadword is its own address.
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: the block lives forever (`init_at`).
    Some(unsafe { &*(p as *const PerCpu) })
}

/// Host builds (unit tests): one stand-in block for "this CPU", index 0.
#[cfg(not(target_os = "none"))]
pub fn try_current() -> Option<&'static PerCpu> {
    static HOST: spin::Once<PerCpu> = spin::Once::new();
    Some(HOST.call_once(|| PerCpu {
        self_ptr: 0,
        index: 0,
        apic_id: AtomicU32::new(0),
        state: AtomicU8::new(STATE_ONLINE),
        virt: AtomicU8::new(0),
        context: AtomicPtr::new(core::ptr::null_mut()),
        svm_hsave: AtomicU64::new(0),
        svm_host_save: AtomicU64::new(0),
        wakes: AtomicU64::new(0),
        ist_base: 0,
        stack: (0, 0),
        tss: TaskStateSegment::new(),
        gdt: GlobalDescriptorTable::new(),
    }))
}

/// This CPU's block.
///
/// # Panics
/// Before [`init_bsp`] (only the first instructions of `kernel_main` run then).
#[inline]
pub fn current() -> &'static PerCpu {
    try_current().expect("percpu::current() before percpu::init_bsp()")
}

/// This CPU's dense index (0 = BSP).
pub fn index() -> usize {
    current().index
}

/// Loads `cpu`'s GDT and TSS on this CPU and points IA32_GS_BASE at it.
fn activate(cpu: &'static PerCpu) {
    gdt::load(&cpu.gdt);
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; the address is canonical (identity
    // mapped RAM) and Vireo's only GS user is `try_current`, which wants exactly this.
    #[cfg(target_os = "none")]
    unsafe {
        super::msr::write(IA32_GS_BASE, cpu as *const PerCpu as u64)
    };
    #[cfg(not(target_os = "none"))]
    let _ = IA32_GS_BASE;
}

/// The BSP's block and IST stacks: statics, touched only by the BSP (in `init_bsp`).
struct BspCell<T>(UnsafeCell<MaybeUninit<T>>);
// SAFETY: written once by the BSP in `init_bsp` before any AP exists; afterwards only read
// through the `&'static PerCpu` (whose shared fields are atomics).
unsafe impl<T> Sync for BspCell<T> {}
static BSP: BspCell<PerCpu> = BspCell(UnsafeCell::new(MaybeUninit::uninit()));
static BSP_IST: BspCell<IstStacks> = BspCell(UnsafeCell::new(MaybeUninit::uninit()));

/// Sets up the BSP's block (index 0) with its GDT, TSS and IST stacks, loads them and sets
/// GS. The first thing `kernel_main` does; call once.
pub fn init_bsp() -> &'static PerCpu {
    static DONE: AtomicBool = AtomicBool::new(false);
    assert!(!DONE.swap(true, Ordering::SeqCst), "percpu::init_bsp called twice");
    #[cfg(target_os = "none")]
    let stack = {
        extern "C" {
            static boot_stack_bottom: u8;
            static boot_stack_top: u8;
        }
        (core::ptr::addr_of!(boot_stack_bottom) as u64, core::ptr::addr_of!(boot_stack_top) as u64)
    };
    #[cfg(not(target_os = "none"))]
    let stack = (0, 0);
    let ist_base = BSP_IST.0.get() as u64;
    let apic_id = raw_cpuid::CpuId::new().get_feature_info().map_or(0, |f| f.initial_local_apic_id() as u32);
    // SAFETY: BSP is a static used for nothing else, initialized once (DONE); BSP_IST is
    // this CPU's alone (a .bss array: zeroed, never read before the CPU pushes on it).
    let cpu = unsafe { PerCpu::init_at(BSP.0.get().cast(), 0, apic_id, ist_base, stack) };
    activate(cpu);
    register(cpu);
    GS_READY.store(true, Ordering::Release);
    cpu.set_state(STATE_ONLINE);
    cpu
}

/// Pages of an AP's area: its block, then its IST stacks, then its kernel stack.
const AP_BLOCK_BYTES: u64 = PAGE_SIZE;
const AP_AREA_BYTES: u64 = AP_BLOCK_BYTES + (IST_COUNT * IST_STACK_SIZE) as u64 + AP_STACK_SIZE;

/// Allocates and registers the block of the AP that gets index `index`, with its IST stacks
/// and kernel stack (zeroed). The memory is never freed: an AP that failed to check in may
/// still wake up one day and use it.
pub fn alloc_ap(frames: &mut FrameAllocator, index: usize, apic_id: u32) -> Result<&'static PerCpu, FrameError> {
    if index == 0 || index >= MAX_CPUS {
        return Err(FrameError::InvalidSize { size: index as u64 });
    }
    let base = frames.alloc(AP_AREA_BYTES, PAGE_SIZE)?;
    // SAFETY: the frames were just handed out for this CPU alone and are identity-mapped
    // writable RAM.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, AP_AREA_BYTES as usize) };
    let ist_base = base + AP_BLOCK_BYTES;
    let stack_lo = ist_base + (IST_COUNT * IST_STACK_SIZE) as u64;
    // SAFETY: the first page is ours (above), page-aligned, and large enough (size assert).
    let cpu =
        unsafe { PerCpu::init_at(base as *mut PerCpu, index, apic_id, ist_base, (stack_lo, base + AP_AREA_BYTES)) };
    register(cpu);
    Ok(cpu)
}

/// Called by an AP first thing in Rust: loads its GDT/TSS and points GS at its block.
///
/// # Safety
/// `cpu` must be the block [`alloc_ap`] made for the calling CPU, activated only once.
pub unsafe fn activate_ap(cpu: &'static PerCpu) {
    activate(cpu);
    cpu.set_state(STATE_ALIVE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{boxed::Box, vec};

    /// An AP's block over host memory: its stack is `stack`, zeroed as `alloc_ap` leaves it.
    fn ap_with_stack(stack: *mut u64, len: usize) -> &'static PerCpu {
        let block: &'static mut core::mem::MaybeUninit<PerCpu> = Box::leak(Box::new(core::mem::MaybeUninit::uninit()));
        let lo = stack as u64;
        let hi = lo + 8 * len as u64;
        // SAFETY: the block is leaked (lives forever) and used by this test alone; the IST
        // base is never used on the host.
        unsafe { PerCpu::init_at(block.as_mut_ptr(), 1, 1, 0, (lo, hi)) }
    }

    #[test]
    fn an_ap_stack_reports_its_peak_and_its_last_bytes() {
        // Only raw pointers to the stack, as the CPU itself has.
        let stack = vec![0u64; 1024].leak().as_mut_ptr();
        let cpu = ap_with_stack(stack, 1024);
        assert_eq!(cpu.stack_peak(), Some(0));
        assert!(!cpu.stack_canary_hit());
        // Used down to 1 KiB above the bottom: peak 7 KiB of 8, canary intact.
        // SAFETY: index 128 of the leaked 1024.
        unsafe { stack.add(128).write_volatile(0xDEAD) };
        assert_eq!(cpu.stack_peak(), Some(8 * 1024 - 1024));
        assert!(!cpu.stack_canary_hit());
        // A write into the lowest 256 bytes.
        // SAFETY: as above.
        unsafe { stack.add(STACK_CANARY_BYTES as usize / 8 - 1).write_volatile(1) };
        assert!(cpu.stack_canary_hit());
    }
}
