//! Starting the application processors (APs): Vireo uses every host CPU the ACPI MADT lists
//! (up to the `cpus=` key), each with its own per-CPU block, GDT/TSS, IST stacks, kernel
//! stack, local APIC setup and VMX/SVM enablement.
//!
//! The BSP wakes each AP with INIT, then STARTUP twice if needed (SDM Vol. 3A §9.4.4.1
//! "Typical BSP Initialization Sequence", §12.6.1): a STARTUP IPI starts the AP in real mode
//! at `vector << 12`, a 4 KiB page below 1 MiB that holds the 16-bit stub below. The stub
//! loads a small GDT and enters 32-bit protected mode at `vireo_ap_pm32` in Vireo's text,
//! which enables PAE, loads Vireo's own page tables (below 4 GiB: CR3 holds 32 bits there),
//! sets EFER.LME/NXE and CR0.PG (SDM Vol. 3A §10.8.5 "Initializing IA-32e Mode"), and jumps
//! to 64-bit code that takes its stack and per-CPU block from [`AP_BOOT`] and calls
//! `vireo_ap_entry`. The 32- and 64-bit code runs from Vireo's text, which Vireo's page
//! tables map executable; the low page is mapped no-execute once paging is on.
//!
//! APs start one at a time: [`AP_BOOT`] holds the parameters of the AP being started, and
//! the BSP waits (bounded, in TSC time) until that AP checks in. An AP that does not is
//! reported, sent INIT again (back to wait-for-SIPI, so it never runs on stale parameters)
//! and left out.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{
    lapic,
    percpu::{self, PerCpu, Virt, STATE_ALIVE, STATE_BOOTING, STATE_ONLINE},
    tsc,
};
use crate::{
    arch::cpu::Virtualization,
    mm::{self, PAGE_SIZE},
    platform::acpi::{self, MAX_LISTED},
    report,
};

/// The parameters the AP being started reads in `vireo_ap_pm32`/`vireo_ap_lm64`.
#[repr(C)]
struct ApBoot {
    /// Vireo's PML4 (below 4 GiB).
    cr3: AtomicU32,
    /// CR4 to load before paging (PAE, PGE as on the BSP).
    cr4: AtomicU32,
    /// CR0 to load (PE, PG, WP, NE, MP as on the BSP; CD/NW clear).
    cr0: AtomicU32,
    /// EFER bits to set (LME, and NXE as on the BSP).
    efer: AtomicU32,
    stack_top: AtomicU64,
    percpu: AtomicU64,
}
const _: () = assert!(core::mem::size_of::<ApBoot>() == 32);

static AP_BOOT: ApBoot = ApBoot {
    cr3: AtomicU32::new(0),
    cr4: AtomicU32::new(0),
    cr0: AtomicU32::new(0),
    efer: AtomicU32::new(0),
    stack_top: AtomicU64::new(0),
    percpu: AtomicU64::new(0),
};

/// The virtualization the BSP enabled, for the APs to enable the same.
static AP_VIRT: spin::Once<Option<Virtualization>> = spin::Once::new();

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .pushsection .rodata.vireo_ap_trampoline, "a"
    .balign 16
    .global vireo_ap_trampoline_start
    .global vireo_ap_trampoline_end
    .code16
vireo_ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl vireo_ap_trampoline_gdtr - vireo_ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $vireo_ap_pm32
    .balign 8
vireo_ap_trampoline_gdtr:
    .short vireo_ap_gdt_end - vireo_ap_gdt - 1
    .long vireo_ap_gdt
vireo_ap_trampoline_end:

    .balign 16
vireo_ap_gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF      /* 0x08: 32-bit code, accessed (no GDT write on load) */
    .quad 0x00CF93000000FFFF      /* 0x10: data, accessed */
    .quad 0x00AF9B000000FFFF      /* 0x18: 64-bit code, accessed */
vireo_ap_gdt_end:
    .popsection

    .pushsection .text.vireo_ap_start, "ax"
    .code32
vireo_ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl {boot}+{cr4}, %eax
    movl %eax, %cr4
    movl {boot}+{cr3}, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl {boot}+{efer}, %eax
    wrmsr
    movl {boot}+{cr0}, %eax
    movl %eax, %cr0
    ljmp $0x18, $vireo_ap_lm64
    .code64
vireo_ap_lm64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq {boot}+{stack}(%rip), %rsp
    movq {boot}+{percpu}(%rip), %rdi
    xorl %ebp, %ebp
    call {entry}
1:  cli
    hlt
    jmp 1b
    .popsection
"#,
    boot = sym AP_BOOT,
    cr3 = const core::mem::offset_of!(ApBoot, cr3),
    cr4 = const core::mem::offset_of!(ApBoot, cr4),
    cr0 = const core::mem::offset_of!(ApBoot, cr0),
    efer = const core::mem::offset_of!(ApBoot, efer),
    stack = const core::mem::offset_of!(ApBoot, stack_top),
    percpu = const core::mem::offset_of!(ApBoot, percpu),
    entry = sym vireo_ap_entry,
    options(att_syntax)
);

/// An AP's first Rust code, on its own stack, interrupts off, Vireo's page tables loaded.
#[cfg(target_os = "none")]
extern "C" fn vireo_ap_entry(cpu: *const PerCpu) -> ! {
    // SAFETY: the BSP made this block for this AP alone (percpu::alloc_ap) and put its
    // address in AP_BOOT just before the STARTUP IPI.
    let cpu: &'static PerCpu = unsafe { &*cpu };
    // SAFETY: first and only activation, by the AP the block was made for.
    unsafe { percpu::activate_ap(cpu) };
    super::idt::load();
    super::fpu::init();
    if !lapic::init_ap() {
        log::warn!("cpu {}: local APIC not enabled", cpu.index());
    }
    if let Some(id) = lapic::id() {
        if id != cpu.apic_id() {
            log::warn!("cpu {}: MADT says APIC ID {}, the APIC says {id}", cpu.index(), cpu.apic_id());
            cpu.set_apic_id(id);
        }
    }
    let virt = match AP_VIRT.get().copied().flatten() {
        Some(v) => match crate::vmm::launch::Hardware::enable(&v, &mut mm::frames()) {
            Ok(crate::vmm::launch::Hardware::Svm(_)) => Virt::Svm,
            Ok(crate::vmm::launch::Hardware::Vmx(_)) => Virt::Vmx,
            Err(e) => {
                log::warn!("cpu {}: virtualization not enabled: {e}", cpu.index());
                Virt::None
            }
        },
        None => Virt::None,
    };
    cpu.set_virt(virt);
    // The BSP waits for us in `start_one` to compare TSCs.
    super::tsc::check_sync_with_peer(false, SYNC_WAIT_TICKS);
    cpu.set_state(STATE_ONLINE);
    crate::sched::ap_main(cpu.index())
}

/// Spins for `us` microseconds of TSC time (a fixed spin count when the TSC is uncalibrated).
fn delay_us(us: u64) {
    let hz = tsc::hz();
    if hz == 0 {
        for _ in 0..us * 1000 {
            core::hint::spin_loop();
        }
        return;
    }
    let t0 = tsc::rdtsc();
    let ticks = tsc::from_nanos(us * 1000);
    while tsc::rdtsc().wrapping_sub(t0) < ticks {
        core::hint::spin_loop();
    }
}

/// Waits up to `us` microseconds for `cpu` to reach `state`.
fn wait_state(cpu: &PerCpu, state: u8, us: u64) -> bool {
    let t0 = tsc::rdtsc();
    let ticks = if tsc::hz() == 0 { u64::MAX } else { tsc::from_nanos(us * 1000) };
    let mut polls: u64 = 0;
    loop {
        if cpu.state() >= state {
            return true;
        }
        polls += 1;
        if tsc::rdtsc().wrapping_sub(t0) > ticks || (tsc::hz() == 0 && polls > us * 1000) {
            return cpu.state() >= state;
        }
        core::hint::spin_loop();
    }
}

/// What happened to one CPU the MADT lists.
#[derive(Clone, Copy)]
enum Fate {
    Online,
    Offline(&'static str),
}

/// Reads `len` bytes of physical memory below 4 GiB (all of it is identity-mapped but page 0).
fn phys_bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr < PAGE_SIZE || end > 1 << 32 {
        return None;
    }
    // SAFETY: Vireo's page tables map all of [4 KiB, 4 GiB) (RAM write-back, the rest
    // uncached); firmware tables are never written by anyone while Vireo runs.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Starts the APs and prints the CPU banner lines. `rsdp` is the boot loader's RSDP copy,
/// `limit` the `cpus=` key, `virt` what the BSP enabled (APs enable the same). The BSP's own
/// per-CPU block gets its APIC ID and virtualization here.
pub fn start_aps(rsdp: Option<(u64, u8)>, limit: Option<u16>, virt: Option<Virtualization>) {
    let bsp = percpu::current();
    let bsp_id = lapic::id();
    if let Some(id) = bsp_id {
        bsp.set_apic_id(id);
    }
    bsp.set_virt(match virt {
        Some(Virtualization::Svm(_)) => Virt::Svm,
        Some(Virtualization::Vmx(_)) => Virt::Vmx,
        _ => Virt::None,
    });
    AP_VIRT.call_once(|| virt);

    let mut ids = [0u32; MAX_LISTED];
    let mut n = 0;
    match rsdp {
        None => report!("acpi madt error=\"the boot loader passed no ACPI RSDP\""),
        Some((addr, _)) => match acpi::find_cpus(addr, phys_bytes) {
            Ok(madt) => {
                if madt.truncated || madt.dropped > 0 {
                    log::warn!(
                        "MADT: {} entries dropped (duplicates or too many){}",
                        madt.dropped,
                        if madt.truncated { ", list ends in a malformed entry" } else { "" }
                    );
                }
                if madt.lapic_addr != 0xFEE0_0000 {
                    log::info!("MADT: local APICs at {:#x}", madt.lapic_addr);
                }
                n = madt.apic_ids().len();
                ids[..n].copy_from_slice(madt.apic_ids());
            }
            Err(e) => report!("acpi madt error=\"{e}\""),
        },
    }
    let bsp_apic = bsp.apic_id();
    if !ids[..n].contains(&bsp_apic) && n < MAX_LISTED {
        // The BSP runs whatever the table says; list it first.
        ids.copy_within(0..n, 1);
        ids[0] = bsp_apic;
        n += 1;
    }
    let ids = &ids[..n];
    let limit = limit.map_or(percpu::MAX_CPUS, |l| (l as usize).min(percpu::MAX_CPUS));

    let mut fates = [Fate::Offline(""); MAX_LISTED];
    let mut next_index = 1;
    let setup = if ids.len() > 1 && limit > 1 { prepare(bsp_id.is_some()) } else { Ok(0) };
    for (i, &id) in ids.iter().enumerate() {
        fates[i] = if id == bsp_apic {
            Fate::Online
        } else if next_index >= limit {
            Fate::Offline("beyond the cpus= limit")
        } else {
            match setup {
                Err(reason) => Fate::Offline(reason),
                Ok(page) => match start_one(next_index, id, page) {
                    Ok(()) => {
                        next_index += 1;
                        Fate::Online
                    }
                    Err((reason, index_used)) => {
                        if index_used {
                            next_index += 1;
                        }
                        Fate::Offline(reason)
                    }
                },
            }
        };
    }

    let used = fates[..n].iter().filter(|f| matches!(f, Fate::Online)).count();
    crate::console::serial::with_console(|c| {
        use core::fmt::Write;
        let _ = write!(c, "vireo: cpus found={n} used={used} apic_ids=");
        for (i, id) in ids.iter().enumerate() {
            let _ = write!(c, "{}{id}", if i == 0 { "" } else { "," });
        }
        let _ = c.write_str("\r\n");
    });
    // Per-CPU lines in index order (the BSP first), then the CPUs left offline.
    for cpu in percpu::online() {
        report!("cpu index={} apic_id={} online virt={}", cpu.index(), cpu.apic_id(), cpu.virt().name());
    }
    for (i, &id) in ids.iter().enumerate() {
        if let Fate::Offline(reason) = fates[i] {
            report!("cpu apic_id={id} offline reason=\"{reason}\"");
        }
    }
    if next_index > 1 {
        let (checks, warps) = super::tsc::sync_figures();
        report!(
            "tsc synchronized={} checks={checks} warps={warps}",
            if super::tsc::synchronized() { "yes" } else { "no" }
        );
        check_wake(next_index);
    }
}

/// Sends every online AP the wake-up IPI and checks that each took it (its HLT ended):
/// `vireo: cpus wake_ipi=ok`, or the indices that did not answer within 100 ms.
fn check_wake(count: usize) {
    let mut failed = [0usize; 16];
    let mut n_failed = 0;
    for index in 1..count {
        let Some(cpu) = percpu::get(index).filter(|c| c.state() == STATE_ONLINE) else { continue };
        let before = cpu.wakes();
        let sent = lapic::send_wake(cpu.apic_id()).is_ok();
        let t0 = tsc::rdtsc();
        let limit = tsc::from_nanos(100_000_000).max(1 << 24);
        while sent && cpu.wakes() == before && tsc::rdtsc().wrapping_sub(t0) < limit {
            core::hint::spin_loop();
        }
        if cpu.wakes() == before {
            if n_failed < failed.len() {
                failed[n_failed] = index;
            }
            n_failed += 1;
        }
    }
    if n_failed == 0 {
        report!("cpus wake_ipi=ok");
    } else {
        report!("cpus wake_ipi=failed count={n_failed} first={:?}", &failed[..n_failed.min(failed.len())]);
    }
}

/// The start-up page below 1 MiB with the real-mode stub, and AP_BOOT's fixed fields.
/// Returns the page's address.
fn prepare(have_apic: bool) -> Result<u64, &'static str> {
    if !have_apic {
        return Err("no local APIC to send INIT/STARTUP with");
    }
    #[cfg(target_os = "none")]
    {
        use x86_64::registers::control::{Cr0, Cr3, Cr4, Cr4Flags};
        extern "C" {
            static vireo_ap_trampoline_start: u8;
            static vireo_ap_trampoline_end: u8;
        }
        let (frame, flags) = Cr3::read_raw();
        let cr3 = frame.start_address().as_u64() | flags as u64;
        if cr3 >= 1 << 32 {
            return Err("Vireo's page tables lie above 4 GiB");
        }
        let start = core::ptr::addr_of!(vireo_ap_trampoline_start);
        let len = core::ptr::addr_of!(vireo_ap_trampoline_end) as usize - start as usize;
        let page = mm::frames()
            .alloc_below(PAGE_SIZE, PAGE_SIZE, 1 << 20)
            .map_err(|_| "no free page below 1 MiB for the start-up code")?;
        // SAFETY: `page` was just taken from the allocator (never freed: an AP that checks in
        // late could still run from it), lies in identity-mapped RAM below 1 MiB, and the
        // stub is `len` (< 4 KiB) bytes of Vireo's rodata.
        unsafe { core::ptr::copy_nonoverlapping(start, page as *mut u8, len) };
        // SAFETY: EFER exists on every x86-64 CPU; reading it has no side effect.
        let efer = unsafe { super::msr::read(super::msr::IA32_EFER) };
        const EFER_LME: u64 = 1 << 8;
        let cr0_keep = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 16) | (1 << 31); // PE MP NE WP PG
        let cr4 = Cr4::read() & (Cr4Flags::PHYSICAL_ADDRESS_EXTENSION | Cr4Flags::PAGE_GLOBAL);
        AP_BOOT.cr3.store(cr3 as u32, Ordering::Relaxed);
        AP_BOOT.cr4.store(cr4.bits() as u32 | (1 << 5), Ordering::Relaxed);
        AP_BOOT.cr0.store((Cr0::read_raw() & cr0_keep) as u32 | 0x8000_0001, Ordering::Relaxed);
        AP_BOOT.efer.store(((efer & super::msr::EFER_NXE) | EFER_LME) as u32, Ordering::Relaxed);
        Ok(page)
    }
    #[cfg(not(target_os = "none"))]
    Err("host build: no APs")
}

/// How long an AP may take (TSC time) to reach Rust after its STARTUP IPIs, and then to
/// finish its initialization. Generous: emulators run CPUs in turns.
const ALIVE_TIMEOUT_US: u64 = 1_000_000;
/// How long either side of the TSC comparison waits for the other (TSC ticks: about a
/// second at emulator rates, well under one on hardware; the AP arrives within its
/// virtualization setup).
const SYNC_WAIT_TICKS: u64 = 4_000_000_000;
const ONLINE_TIMEOUT_US: u64 = 5_000_000;

/// Starts the AP with `apic_id` as CPU `index` from the stub at `page`. On failure: the
/// reason, and whether `index` was used up (the AP ran Vireo code with it).
fn start_one(index: usize, apic_id: u32, page: u64) -> Result<(), (&'static str, bool)> {
    let cpu = percpu::alloc_ap(&mut mm::frames(), index, apic_id)
        .map_err(|_| ("out of memory for its per-CPU area and stacks", false))?;
    AP_BOOT.stack_top.store(cpu.stack().1, Ordering::Relaxed);
    AP_BOOT.percpu.store(cpu as *const PerCpu as u64, Ordering::Relaxed);
    // The AP reads AP_BOOT after the IPIs; the APIC writes are serializing for this CPU's
    // stores (uncached MMIO / WRMSR), and the fence makes the order explicit.
    core::sync::atomic::fence(Ordering::SeqCst);
    let ipi = |r: Result<(), lapic::IpiError>| r.map_err(|e| (e.text(), false));
    ipi(lapic::send_init(apic_id))?;
    delay_us(10_000);
    let vector = (page >> 12) as u8;
    ipi(lapic::send_sipi(apic_id, vector))?;
    delay_us(200);
    if cpu.state() == STATE_BOOTING {
        ipi(lapic::send_sipi(apic_id, vector))?;
    }
    if !wait_state(cpu, STATE_ALIVE, ALIVE_TIMEOUT_US) {
        // Back to wait-for-SIPI, so it never runs later with another AP's parameters.
        let _ = lapic::send_init(apic_id);
        return Err(("did not answer INIT-SIPI-SIPI", false));
    }
    super::tsc::check_sync_with_peer(true, SYNC_WAIT_TICKS);
    if !wait_state(cpu, STATE_ONLINE, ONLINE_TIMEOUT_US) {
        let _ = lapic::send_init(apic_id);
        return Err(("started but did not finish its initialization", true));
    }
    Ok(())
}
