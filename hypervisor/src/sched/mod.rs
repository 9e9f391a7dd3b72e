//! The vCPU scheduler: every host CPU runs [`cpu_main`], which time-slices the vCPUs
//! assigned to it. vCPUs are spread over the host CPUs when their VM starts and stay there
//! (a VMX VMCS is active on one CPU; a vCPU that never moves needs no VMCLEAR/VMPTRLD
//! migration and no TLB flush). A blocked vCPU (HLT, wait-for-SIPI) costs no CPU: its host
//! CPU halts with its timer armed for the earliest deadline, and whoever wakes the vCPU
//! (an IPI from another vCPU, a device interrupt) kicks the host CPU with a host IPI.
//!
//! The time a vCPU was runnable but not running (waiting for its host CPU) is its steal
//! time, recorded per vCPU.

use alloc::{sync::Arc, vec::Vec};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;

use crate::{
    arch::{
        percpu::{self, Virt},
        tsc,
    },
    console::serial,
    mm, report,
    vmm::{
        launch::{AnyBackend, Hardware},
        vcpu::{SliceEnd, VcpuState},
        vm::{rdtsc, Vm, VmOutcome},
    },
};

pub mod focus;

/// Most host CPUs the scheduler drives.
pub const MAX_CPUS: usize = 64;

/// Default time slice.
pub const DEFAULT_SLICE_US: u64 = 5_000;
/// The slice of a vCPU alone on its host CPU: nobody waits for that CPU (a vCPU placed or
/// woken there kicks it at once), so the slice timer only costs the guest exits. It still
/// ends now and then so the host loop comes round (retiring, bookkeeping).
pub const LONE_SLICE_US: u64 = 100_000;
/// ... except on CPU 0 while keyboard input is polled between slices: a typed key then waits
/// at most this long.
pub const LONE_POLLING_SLICE_US: u64 = 20_000;

/// The time slice in microseconds: `base_us` (`slice_us=`) when other vCPUs share the host
/// CPU, longer when the vCPU is `alone` there (never shorter than `base_us`).
pub fn slice_us(base_us: u64, alone: bool, polling_input: bool) -> u64 {
    match (alone, polling_input) {
        (false, _) => base_us,
        (true, false) => base_us.max(LONE_SLICE_US),
        (true, true) => base_us.max(LONE_POLLING_SLICE_US),
    }
}

/// One vCPU as its host CPU holds it.
struct Task {
    vm: Arc<Vm>,
    vcpu: usize,
    /// Built on first run, on this CPU, and released here.
    backend: Option<AnyBackend>,
}

/// Tasks handed to a CPU (at VM start); the CPU moves them into its own list.
static INBOX: [Mutex<Vec<Task>>; MAX_CPUS] = [const { Mutex::new(Vec::new()) }; MAX_CPUS];
/// Set to make a CPU's running vCPU give up its slice (another vCPU there was woken).
static YIELD: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// The local APIC ID of each scheduler CPU (for kicks).
static APIC_ID: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// How many host CPUs run the scheduler (indices 0..ONLINE).
static ONLINE: AtomicUsize = AtomicUsize::new(1);
static NEXT_CPU: AtomicUsize = AtomicUsize::new(0);
static SLICE_US: AtomicU64 = AtomicU64::new(DEFAULT_SLICE_US);
/// VMs started and not yet finished; VMs that ended as expected / not.
static LIVE_VMS: AtomicUsize = AtomicUsize::new(0);
static VMS_OK: AtomicUsize = AtomicUsize::new(0);
static VMS_FAILED: AtomicUsize = AtomicUsize::new(0);
/// VM lines refused before start.
static VMS_REFUSED: AtomicUsize = AtomicUsize::new(0);

/// The hardware every scheduler CPU drives, once configured.
static HW: spin::Once<Hardware> = spin::Once::new();
/// Scheduler index of each per-CPU index (usize::MAX: not a scheduler CPU).
static SCHED_OF: [AtomicUsize; percpu::MAX_CPUS] = [const { AtomicUsize::new(usize::MAX) }; percpu::MAX_CPUS];

/// Makes the boot CPU and every online AP with virtualization enabled scheduler CPUs
/// (index 0 is the boot CPU), sets the time slice, and wakes the APs into [`cpu_main`].
pub fn configure(hw: Hardware, slice_us: u64) {
    let mut n = 0;
    let bsp = percpu::current();
    let aps = percpu::online().filter(|c| c.index() != bsp.index() && c.virt() != Virt::None);
    for cpu in core::iter::once(bsp).chain(aps).take(MAX_CPUS) {
        SCHED_OF[cpu.index()].store(n, Ordering::Relaxed);
        APIC_ID[n].store(cpu.apic_id(), Ordering::Relaxed);
        n += 1;
    }
    SLICE_US.store(slice_us.max(100), Ordering::Relaxed);
    ONLINE.store(n, Ordering::Release);
    HW.call_once(|| hw);
    report!("sched cpus={n} slice_us={}", SLICE_US.load(Ordering::Relaxed));
    for id in APIC_ID.iter().take(n).skip(1) {
        let _ = crate::arch::lapic::send_wake(id.load(Ordering::Relaxed));
    }
}

pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// This host CPU's scheduler index.
fn this_cpu() -> usize {
    SCHED_OF[percpu::index() % percpu::MAX_CPUS].load(Ordering::Relaxed)
}

/// Wakes host CPU `cpu`: its running vCPU gives up the slice, a halted CPU leaves HLT.
pub fn kick(cpu: usize) {
    let cpu = cpu % MAX_CPUS;
    YIELD[cpu].store(true, Ordering::Release);
    if cpu != this_cpu() {
        // An IPI that cannot be sent leaves the CPU to notice at its next timer or exit.
        let _ = crate::arch::lapic::send_wake(APIC_ID[cpu].load(Ordering::Relaxed));
    }
}

/// An AP's life after its initialization: once the scheduler is configured it runs
/// [`cpu_main`]; a CPU the scheduler does not use (no virtualization) idles in HLT.
pub fn ap_main(index: usize) -> ! {
    loop {
        if let Some(hw) = HW.get() {
            let s = SCHED_OF[index % percpu::MAX_CPUS].load(Ordering::Acquire);
            if s != usize::MAX {
                cpu_main(s, *hw);
            }
        }
        halt_until_interrupt();
    }
}

/// A VM line was refused: the run is not a plain success.
pub fn note_refused() {
    VMS_REFUSED.fetch_add(1, Ordering::Relaxed);
}

/// Starts `vm`: its vCPUs are spread over the host CPUs, round robin across all VMs.
pub fn start_vm(mut vm: Vm) {
    vm.start_clock();
    let vm = Arc::new(vm);
    LIVE_VMS.fetch_add(1, Ordering::AcqRel);
    if vm.uart.is_some() {
        focus::add(Arc::downgrade(&vm));
    }
    let n = online();
    let mut placed = [0usize; 16];
    for i in 0..vm.vcpus.len() {
        let cpu = NEXT_CPU.fetch_add(1, Ordering::Relaxed) % n;
        vm.irq.apic(i).host_cpu.store(cpu, Ordering::Relaxed);
        if let Some(p) = placed.get_mut(i) {
            *p = cpu;
        }
        INBOX[cpu].lock().push(Task { vm: vm.clone(), vcpu: i, backend: None });
        kick(cpu);
    }
    let shown = vm.vcpus.len().min(placed.len());
    report!("vm name={} placed host_cpus={}", vm.name, CpuList(&placed[..shown]));
}

struct CpuList<'a>(&'a [usize]);

impl core::fmt::Display for CpuList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// What a VM's end says about the run: powered off or exited with status 0 is as expected,
/// unless the VM line expects something else (`expect=` on the VM line; `expect=exited:N`
/// also names the status).
fn as_expected(vm: &Vm, outcome: VmOutcome) -> bool {
    match vm.expect {
        Some(want) => {
            want == outcome.name()
                && vm.expect_status.is_none_or(|s| matches!(outcome, VmOutcome::Exited { status } if status == s))
        }
        None => matches!(outcome, VmOutcome::PoweredOff | VmOutcome::Exited { status: 0 }),
    }
}

/// Consecutive restarts after which a VM whose guest keeps resetting it ends instead.
pub const MAX_RESTARTS: u32 = 64;

/// Reports a VM whose vCPUs are all retired and gives its memory back. A VM whose guest
/// reset the machine starts again, freshly built (new memory, devices and vCPUs).
fn finish(vm: Arc<Vm>) {
    vm.report_end();
    let outcome = vm.outcome().map(|(o, _)| o).unwrap_or(VmOutcome::Halted);
    let relaunch = vm.relaunch.filter(|r| outcome == VmOutcome::Reset && r.boot <= MAX_RESTARTS);
    if let Some(r) = relaunch {
        let name = vm.name.clone();
        let old = vm.mem.host_range();
        release(vm);
        restart(&name, r, old);
        if LIVE_VMS.fetch_sub(1, Ordering::AcqRel) == 1 {
            kick(0);
        }
        return;
    }
    let ok = as_expected(&vm, outcome);
    report!("vm name={} result={}", vm.name, if ok { "as-expected" } else { "unexpected" });
    if ok {
        VMS_OK.fetch_add(1, Ordering::Relaxed);
    } else {
        VMS_FAILED.fetch_add(1, Ordering::Relaxed);
    }
    release(vm);
    if LIVE_VMS.fetch_sub(1, Ordering::AcqRel) == 1 {
        kick(0);
    }
}

/// Builds and starts a reset VM again (its LIVE_VMS count is taken before the old one's is
/// dropped, so the run does not end in between). `old` is the host RAM the previous boot
/// had: the report says how much of it the new boot got back (`reused_mib`), which lazy
/// zeroing keeps from showing the previous boot's data (`vmm::guest_mem`).
fn restart(name: &str, r: crate::vmm::vm::Relaunch, old: core::ops::Range<u64>) {
    let Some(hw) = HW.get() else { return };
    let boot = r.boot + 1;
    let built = crate::vmm::launch::build_vm(hw, &mut mm::frames(), &r.spec, r.files, kick, boot);
    let reused = match &built {
        Ok(vm) => {
            let new = vm.mem.host_range();
            new.end.min(old.end).saturating_sub(new.start.max(old.start)) >> 20
        }
        Err(_) => 0,
    };
    report!("vm name={name} restart boot={boot} reused_mib={reused}");
    match built {
        Ok(mut vm) => {
            vm.relaunch = Some(crate::vmm::vm::Relaunch { boot, ..r });
            start_vm(vm);
        }
        Err(e) => {
            report!("vm name={name} not restarted reason=\"{e}\"");
            VMS_FAILED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Gives a finished VM's memory back. Other holders let go within moments (a CPU that just
/// retired a vCPU of it, the console poll): waits for them up to 100 ms.
fn release(vm: Arc<Vm>) {
    let give_up = rdtsc().saturating_add(tsc::hz() / 10);
    let mut vm = vm;
    loop {
        match Arc::try_unwrap(vm) {
            Ok(vm) => {
                vm.into_memory().release(&mut mm::frames());
                return;
            }
            Err(v) if rdtsc() < give_up => {
                vm = v;
                core::hint::spin_loop();
            }
            Err(v) => {
                log::warn!("vm {}: still referenced at its end; its memory is not reused", v.name);
                return;
            }
        }
    }
}

/// Whether a task can run now (polling a blocked vCPU for wake-ups).
fn runnable(t: &Task) -> bool {
    let Some(mut v) = t.vm.vcpus[t.vcpu].try_lock() else { return false };
    match v.state {
        VcpuState::Runnable => true,
        VcpuState::Stopped => false,
        _ => v.poll(&t.vm),
    }
}

/// The host loop of scheduler CPU `cpu` on hardware `hw`. CPU 0 also polls the console for
/// keyboard input and ends the run when every VM has ended.
pub fn cpu_main(cpu: usize, hw: Hardware) -> ! {
    let mut tasks: Vec<Task> = Vec::new();
    let mut next = 0usize;
    let this = crate::arch::percpu::current();
    loop {
        // An AP's stack has no guard page: a stack that reached its last bytes stops Vireo
        // with a report instead of running on over the IST stacks below it.
        if this.stack_canary_hit() {
            report!("fatal cpu index={cpu} kernel stack overflow (reached its lowest bytes)");
            crate::platform::exit::fail("kernel stack overflow");
        }
        tasks.append(&mut INBOX[cpu].lock());
        YIELD[cpu].store(false, Ordering::Release);
        if cpu == 0 {
            focus::poll_input();
            if LIVE_VMS.load(Ordering::Acquire) == 0 && tasks.is_empty() {
                all_ended();
            }
        }
        // Retire the vCPUs of VMs that ended (on this CPU: the backend lives here).
        let mut i = 0;
        while i < tasks.len() {
            if !tasks[i].vm.ended() {
                i += 1;
                continue;
            }
            let mut t = tasks.swap_remove(i);
            {
                let mut v = t.vm.vcpus[t.vcpu].lock();
                t.vm.set_state(&mut v, VcpuState::Stopped);
            }
            if let Some(b) = t.backend.take() {
                b.release(&mut mm::frames());
            }
            let vm = t.vm;
            if vm.live_vcpus.fetch_sub(1, Ordering::AcqRel) == 1 {
                finish(vm);
            }
        }
        let now = rdtsc();
        let count = tasks.len();
        // A vCPU something just arrived for (an IPI, a device interrupt) goes first, unless
        // it is the one that just ran (a vCPU that keeps getting interrupts must not starve
        // the others); then round robin.
        let last = next.checked_sub(1);
        let woken = (0..count).find(|&i| {
            let t = &tasks[i];
            Some(i) != last && t.vm.irq.apic(t.vcpu).attention.load(Ordering::Acquire) && runnable(t)
        });
        let mut picked = woken;
        for k in 0..count {
            if picked.is_some() {
                break;
            }
            let i = (next + k) % count;
            if runnable(&tasks[i]) {
                picked = Some(i);
            }
        }
        let Some(i) = picked else {
            idle(cpu, &tasks);
            continue;
        };
        next = i + 1;
        // Runnable vCPUs left waiting accrue steal time from now.
        for (k, t) in tasks.iter().enumerate() {
            if k != i {
                if let Some(mut v) = t.vm.vcpus[t.vcpu].try_lock() {
                    if v.state == VcpuState::Runnable && v.sched.runnable_since.is_none() {
                        v.sched.runnable_since = Some(now);
                    }
                }
            }
        }
        // The slice ends early if a blocked vCPU here has a timer due before it. A vCPU alone
        // here gets a long one: its slice timer would only cost it exits.
        let polling = cpu == 0 && focus::wants_polling();
        let slice = tsc::from_nanos(slice_us(SLICE_US.load(Ordering::Relaxed), count == 1, polling) * 1000);
        let others = tasks
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != i)
            .filter_map(|(_, t)| t.vm.vcpus[t.vcpu].try_lock().and_then(|v| v.wake_deadline(&t.vm)))
            .min();
        let slice_end = others.map_or(now + slice, |d| d.min(now + slice)).max(now + slice / 16);
        let t = &mut tasks[i];
        let vm = t.vm.clone();
        let mut v = vm.vcpus[t.vcpu].lock();
        if t.backend.is_none() {
            match AnyBackend::new(&hw, &mut mm::frames(), vm.mem.nested_root()) {
                Ok(b) => t.backend = Some(b),
                Err(e) => {
                    report!("vm name={} vcpu={} not started reason=\"{e}\"", vm.name, v.index);
                    drop(v);
                    vm.stop(VmOutcome::Fatal { reason: "cannot create a vCPU on this host CPU" });
                    continue;
                }
            }
        }
        if let Some(since) = v.sched.runnable_since.take() {
            v.sched.steal += now.saturating_sub(since);
            vm.counters[v.index].steal.store(v.sched.steal, Ordering::Relaxed);
        }
        v.sched.slices += 1;
        let Some(backend) = t.backend.as_mut() else { continue };
        let end = backend.run(&mut v, &vm, slice_end, &YIELD[cpu]);
        v.sched.run += rdtsc().saturating_sub(now);
        if end == SliceEnd::Preempted {
            v.sched.runnable_since = Some(rdtsc());
        }
    }
}

/// Nothing to run here: halt until the earliest deadline of a blocked vCPU (or a kick).
fn idle(cpu: usize, tasks: &[Task]) {
    let mut until =
        tasks.iter().filter_map(|t| t.vm.vcpus[t.vcpu].try_lock().and_then(|v| v.wake_deadline(&t.vm))).min();
    if cpu == 0 && focus::wants_polling() {
        // Keyboard input is polled about every millisecond.
        let poll = rdtsc() + tsc::hz() / 1000;
        until = Some(until.map_or(poll, |u| u.min(poll)));
    }
    if until.is_some_and(|u| u <= rdtsc()) {
        return;
    }
    match until {
        Some(t) => crate::arch::lapic::arm(t),
        None => crate::arch::lapic::disarm(),
    }
    let due =
        || YIELD[cpu].load(Ordering::Acquire) || !INBOX[cpu].lock().is_empty() || until.is_some_and(|u| u <= rdtsc());
    if due() {
        return;
    }
    // While it idles, this CPU writes Vireo's console output out (one idle CPU at a time:
    // `console::serial`), so vCPUs printing elsewhere do not wait for the UART. A writer
    // wakes it with a host IPI when it is halted. The interrupt that ends the halt (a kick,
    // the timer, a writer's IPI) stays pending while interrupts are off here, so none is
    // lost between the checks and the halt.
    let apic = APIC_ID[cpu].load(Ordering::Relaxed);
    if !serial::idle_claim(apic) {
        halt_until_interrupt();
        return;
    }
    loop {
        if serial::idle_drain(apic) {
            halt_until_interrupt();
            serial::idle_awake(apic);
            // Back to the scheduler for anything but more output (written out here).
            if !serial::pending() {
                break;
            }
        }
        if due() {
            break;
        }
    }
    // Leaving: what writers left to this CPU is written out before anything runs here.
    serial::idle_release();
}

/// Halts until an interrupt (the host timer, a kick) arrives; interrupts are off again after.
fn halt_until_interrupt() {
    // SAFETY: Vireo's IDT handles every vector (the timer and wake-up IPI handlers only EOI);
    // STI's one-instruction shadow covers HLT, so an interrupt already pending ends the HLT
    // instead of being taken before it (no lost wake-up).
    #[cfg(target_os = "none")]
    unsafe {
        core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack))
    };
}

/// Every VM has ended: the run's verdict, then Vireo ends.
pub fn all_ended() -> ! {
    let ok = VMS_OK.load(Ordering::Relaxed);
    let failed = VMS_FAILED.load(Ordering::Relaxed);
    let refused = VMS_REFUSED.load(Ordering::Relaxed);
    report!("vms ended as_expected={ok} unexpected={failed} refused={refused}");
    for c in crate::arch::percpu::online() {
        if let Some(peak) = c.stack_peak() {
            let (lo, hi) = c.stack();
            report!("stack cpu={} peak_bytes={peak} size_bytes={}", c.index(), hi - lo);
        }
    }
    report!("nothing to run");
    if failed == 0 && refused == 0 {
        crate::platform::exit::success()
    } else if failed > 0 {
        crate::platform::exit::fail("a VM did not end as expected")
    } else {
        crate::platform::exit::fail("a VM line was refused")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_vcpus_get_long_slices() {
        assert_eq!(slice_us(DEFAULT_SLICE_US, false, false), DEFAULT_SLICE_US);
        assert_eq!(slice_us(DEFAULT_SLICE_US, false, true), DEFAULT_SLICE_US);
        assert_eq!(slice_us(DEFAULT_SLICE_US, true, false), LONE_SLICE_US);
        assert_eq!(slice_us(DEFAULT_SLICE_US, true, true), LONE_POLLING_SLICE_US);
        // A slice_us= longer than the lone slice is kept.
        assert_eq!(slice_us(500_000, true, false), 500_000);
        assert_eq!(slice_us(500_000, true, true), 500_000);
    }
}
