//! The run loop and exit dispatch on the host, over a scripted mock backend: what the core
//! decides for each exit, without any virtualization hardware.

use alloc::{collections::VecDeque, vec::Vec};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use guest_abi::hypercall::nr;

use super::*;
use crate::{
    devices::{bus::Bus, irqchip::Interrupts, lapic::DEFAULT_TIMER_HZ},
    mm::FrameAllocator,
    vmm::{
        exit::HypercallInsn,
        guest_mem::GuestMemory,
        state::{Segment, RFLAGS_RESERVED_1},
        vm::Vm,
    },
};

type Step = (fn(&mut GuestRegs), ExitKind);

/// A backend that plays a script of exits and records what the core asked of it.
#[derive(Default)]
struct Mock {
    script: VecDeque<Step>,
    rip: u64,
    rflags: u64,
    efer: u64,
    pat: u64,
    interruptible: bool,
    pending: Option<Event>,
    injected: Vec<Event>,
    loaded: Vec<CpuState>,
    window: bool,
}

impl Mock {
    fn new(steps: &[Step]) -> Self {
        Self {
            script: steps.iter().copied().collect(),
            rflags: RFLAGS_RESERVED_1 | RFLAGS_IF,
            interruptible: true,
            ..Self::default()
        }
    }
}

/// Ends the script: the guest asks to end its VM with status 0.
fn vm_exit(r: &mut GuestRegs) {
    r.rax = nr::VM_EXIT;
    r.rbx = 0;
}

impl Backend for Mock {
    fn load_state(&mut self, state: &CpuState) {
        self.rip = state.rip;
        self.loaded.push(*state);
    }
    fn run(&mut self, regs: &mut GuestRegs) -> Exit {
        if let Some(e) = self.pending.take() {
            self.injected.push(e);
        }
        let (set, kind) = self.script.pop_front().unwrap_or((vm_exit, ExitKind::Hypercall(HypercallInsn::Vmcall)));
        set(regs);
        Exit { kind, rip: self.rip, next_rip: self.rip + 2, raw: 0, tsc: rdtsc(), events: Default::default() }
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, rflags: u64) {
        self.rflags = rflags;
    }
    fn cr0(&self) -> u64 {
        0x8000_0011
    }
    fn cr3(&self) -> u64 {
        0
    }
    fn cr4(&self) -> u64 {
        0x20
    }
    fn efer(&self) -> u64 {
        self.efer
    }
    fn set_efer(&mut self, efer: u64) {
        self.efer = efer;
    }
    fn pat(&self) -> u64 {
        self.pat
    }
    fn set_pat(&mut self, pat: u64) {
        self.pat = pat;
    }
    fn long_mode(&self) -> bool {
        true
    }
    fn cpl(&self) -> u8 {
        0
    }
    fn segment(&self, _seg: SegReg) -> Segment {
        Segment::default()
    }
    fn inject(&mut self, event: Event) {
        self.pending = Some(event);
    }
    fn pending_event(&self) -> Option<Event> {
        self.pending
    }
    fn event_pending(&self) -> bool {
        self.pending.is_some()
    }
    fn interruptible(&self) -> bool {
        self.interruptible
    }
    fn set_interrupt_window(&mut self, enable: bool) {
        self.window = enable;
    }
    fn set_exception_intercepts(&mut self, _vectors: u32) {}

    fn flush_guest_tlb(&mut self) {}
}

/// `OUT` of a dword to the self-test interrupt source (`guest_abi`): vector in AL, delay above.
const TEST_IRQ_OUT: ExitKind = ExitKind::Io(IoAccess {
    port: guest_abi::hypercall::TEST_IRQ_PORT,
    size: 4,
    write: true,
    string: false,
    rep: false,
});

static KICKS: AtomicU64 = AtomicU64::new(0);

fn count_kick(cpu: usize) {
    KICKS.fetch_or(1 << cpu, Ordering::Relaxed);
}

/// A test-guest VM (no PC platform) with `cpus` vCPUs; vCPU 0 starts at 0x1000.
fn test_vm(cpus: usize) -> Vm {
    let mut frames = FrameAllocator::for_tests();
    let mem = GuestMemory::for_tests(&mut frames);
    let irq = Interrupts::new(cpus, false, DEFAULT_TIMER_HZ, count_kick);
    for i in 0..cpus {
        irq.apic(i).host_cpu.store(i, Ordering::Relaxed);
    }
    let boot = CpuState { rip: 0x1000, ..CpuState::reset() };
    let vcpus = (0..cpus).map(|i| Vcpu::new(i, (i == 0).then_some(boot), false).unwrap()).collect();
    Vm::new("t", mem, Bus::new(), irq, vcpus, false, true)
}

fn run(vm: &Vm, index: usize, mock: &mut Mock) -> SliceEnd {
    let no = AtomicBool::new(false);
    vm.vcpus[index].lock().run(vm, mock, u64::MAX, &no)
}

#[test]
fn cpuid_goes_through_the_policy_and_a_hypercall_ends_the_vm() {
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rax = 0x4000_0100, ExitKind::Cpuid), (|r| r.rax = 0x4000_0101, ExitKind::Cpuid)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.loaded.len(), 1, "the boot state was loaded once");
    assert_eq!(vm.outcome(), Some((VmOutcome::Exited { status: 0 }, 0)));
    assert_eq!(vm.counters[0].exits.snapshot().total().count, 3);
    // 0x1000 + three instructions of 2 bytes (the mock's length) on exits that advance.
    assert_eq!(m.rip, 0x1000 + 4, "CPUIDs advanced RIP; the exiting hypercall did not need to");
}

#[test]
fn unknown_msr_raises_gp_and_hlt_with_interrupts_off_ends_a_lone_vcpu() {
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rcx = 0xDEAD_0000, ExitKind::Rdmsr)]);
    m.script.push_back((|_| {}, ExitKind::Hlt));
    // The #GP is delivered at the entry after the RDMSR exit.
    m.rflags = RFLAGS_RESERVED_1;
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.injected, [Event::GP0]);
    assert_eq!(vm.outcome().map(|o| o.0), Some(VmOutcome::Halted));
}

#[test]
fn hlt_blocks_and_a_test_interrupt_wakes() {
    let vm = test_vm(1);
    // OUT to the test interrupt port: vector 0x40 after a short delay, then HLT.
    let mut m = Mock::new(&[(|r| r.rax = 0x40 | (10_000 << 8), TEST_IRQ_OUT), (|_| {}, ExitKind::Hlt)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::Blocked);
    assert_eq!(vm.vcpus[0].lock().state, VcpuState::Halted { if_off: false });
    // The scheduler polls until the timer is due.
    let mut woke = false;
    for _ in 0..10_000_000 {
        if vm.vcpus[0].lock().poll(&vm) {
            woke = true;
            break;
        }
    }
    assert!(woke, "the test timer woke the vCPU");
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.injected, [Event::Interrupt { vector: 0x40 }]);
}

#[test]
fn the_time_limit_ends_a_vm_whose_vcpus_are_all_halted() {
    let mut vm = test_vm(1);
    // A wakeable HLT (the test timer is armed far ahead): no exit will come to see the limit.
    let mut m = Mock::new(&[(|r| r.rax = 0x40 | (0xFF_FFFF << 8), TEST_IRQ_OUT), (|_| {}, ExitKind::Hlt)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::Blocked);
    assert!(!vm.vcpus[0].lock().poll(&vm), "nothing woke it yet");
    // The limit passes while it is halted: the wake-up deadline names it and the poll then
    // ends the VM.
    vm.deadline = Some(rdtsc() + 1_000);
    assert_eq!(vm.vcpus[0].lock().wake_deadline(&vm), vm.deadline);
    let mut ended = false;
    for _ in 0..10_000_000 {
        if vm.vcpus[0].lock().poll(&vm) {
            ended = true;
            break;
        }
    }
    assert!(ended && vm.ended(), "the VM timed out");
    assert_eq!(vm.outcome().map(|o| o.0), Some(VmOutcome::TimedOut));
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
}

const X2APIC_ON: u64 = 0xFEE0_0000 | (1 << 11) | (1 << 10);

fn wrmsr(r: &mut GuestRegs, msr: u32, value: u64) {
    r.rcx = msr as u64;
    r.rax = value & 0xFFFF_FFFF;
    r.rdx = value >> 32;
}

#[test]
fn init_sipi_start_an_ap_and_fixed_ipis_reach_it() {
    let vm = test_vm(2);
    assert_eq!(vm.vcpus[1].lock().state, VcpuState::WaitForSipi);
    assert!(!vm.vcpus[1].lock().poll(&vm), "an AP does not run before SIPI");
    // The BSP: x2APIC on, software-enabled, then INIT and STARTUP (vector 0x9A) to APIC 1.
    let mut bsp = Mock::new(&[
        (|r| wrmsr(r, 0x1B, X2APIC_ON), ExitKind::Wrmsr),
        (|r| wrmsr(r, 0x80F, 0x1FF), ExitKind::Wrmsr),
        (|r| wrmsr(r, 0x830, (1 << 32) | (5 << 8) | (1 << 14)), ExitKind::Wrmsr),
        (|r| wrmsr(r, 0x830, (1 << 32) | (6 << 8) | 0x9A), ExitKind::Wrmsr),
        (|_| {}, ExitKind::Hlt),
    ]);
    KICKS.store(0, Ordering::Relaxed);
    assert_eq!(run(&vm, 0, &mut bsp), SliceEnd::Blocked);
    assert!(KICKS.load(Ordering::Relaxed) & 2 != 0, "the AP's host CPU was kicked");
    assert!(vm.vcpus[1].lock().poll(&vm), "SIPI made the AP runnable");
    assert_eq!(vm.vcpus[1].lock().state, VcpuState::Runnable);
    // The AP enables its APIC and halts; its first entry loads the SIPI state.
    let mut ap = Mock::new(&[
        (|r| wrmsr(r, 0x1B, X2APIC_ON), ExitKind::Wrmsr),
        (|r| wrmsr(r, 0x80F, 0x1FF), ExitKind::Wrmsr),
        (|_| {}, ExitKind::Hlt),
    ]);
    assert_eq!(run(&vm, 1, &mut ap), SliceEnd::Blocked);
    assert_eq!(ap.loaded.len(), 1);
    assert_eq!((ap.loaded[0].cs.selector, ap.loaded[0].cs.base, ap.loaded[0].rip), (0x9A00, 0x9_A000, 0));
    // The BSP (woken by nothing yet) sends vector 0x41 to all but itself.
    vm.set_state(&mut vm.vcpus[0].lock(), VcpuState::Runnable);
    let mut bsp2 = Mock::new(&[(|r| wrmsr(r, 0x830, (3 << 18) | 0x41), ExitKind::Wrmsr)]);
    assert_eq!(run(&vm, 0, &mut bsp2), SliceEnd::VmEnded);
    // The VM ended (the BSP's script ran out): the AP is told so, and had the IPI pending.
    assert_eq!(vm.irq.apic(1).lapic.lock().pending(), Some(0x41));
    assert!(vm.ended());
}

#[test]
fn interrupt_window_policy_is_the_cores() {
    let vm = test_vm(1);
    // A test interrupt raised while the guest cannot take it: the core asks for a window,
    // and injects once the window exit says the guest can.
    let mut m = Mock::new(&[(|r| r.rax = 0x41, TEST_IRQ_OUT), (|_| {}, ExitKind::Cpuid)]);
    m.interruptible = false;
    let no = AtomicBool::new(false);
    // Run two exits by hand: after the OUT, the next entry wants a window.
    m.script.push_back((|_| {}, ExitKind::InterruptWindow));
    let end = vm.vcpus[0].lock().run(&vm, &mut m, u64::MAX, &no);
    assert_eq!(end, SliceEnd::VmEnded);
    // The window was requested while the guest could not take the interrupt, and the
    // interrupt was never injected (the mock stays uninterruptible) ...
    assert!(m.injected.is_empty());
    assert!(m.window, "the core asked for a window again");
    // ... then with the guest interruptible, the window exit clears the request and the
    // interrupt goes in.
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rax = 0x41, TEST_IRQ_OUT)]);
    m.window = true;
    m.script.push_back((|_| {}, ExitKind::InterruptWindow));
    assert_eq!(vm.vcpus[0].lock().run(&vm, &mut m, u64::MAX, &no), SliceEnd::VmEnded);
    assert!(!m.window, "the core cleared the window request");
    assert_eq!(m.injected, [Event::Interrupt { vector: 0x41 }]);
}

#[test]
fn a_pause_loop_exit_yields_the_host_cpu() {
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|_| {}, ExitKind::Pause)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::Preempted);
    assert_eq!(m.rip, 0x1002, "PAUSE completed (the boot state starts at 0x1000)");
    assert!(!vm.ended());
}

#[test]
fn every_vcpu_halted_with_interrupts_off_ends_the_vm() {
    let vm = test_vm(2);
    let mut m = Mock::new(&[(|_| {}, ExitKind::Hlt)]);
    m.rflags = RFLAGS_RESERVED_1;
    // vCPU 1 still waits for SIPI: nothing can wake either.
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(vm.outcome().map(|o| o.0), Some(VmOutcome::Halted));
}
