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
        exit::{ExitEvents, HypercallInsn},
        fast::FastExits,
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
    /// 32-bit protected mode, paging off, flat segments (a multiboot kernel's state).
    flat32: bool,
    cr2: u64,
    /// The next entry's queued event is not delivered: the exit reports it as interrupted
    /// and it stays queued (as SVM's EXITINTINFO re-queue does).
    interrupt_delivery: bool,
    /// The guest's privilege level.
    cpl: u8,
    /// Hypercalls the core's fast path answered in `run_fast`'s loop.
    fast_answered: u32,
    /// Exits taken so far, and how many had been taken at each injection.
    exits: usize,
    injected_after: Vec<usize>,
    /// Passes of the run loop's per-entry work (each arms the deadline once).
    slow_passes: u32,
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
        let mut events = ExitEvents::default();
        if let Some(e) = self.pending.take() {
            if core::mem::take(&mut self.interrupt_delivery) {
                (events.injected, events.interrupted, self.pending) = (Some(e), Some(e), Some(e));
            } else {
                self.injected.push(e);
                self.injected_after.push(self.exits);
            }
        }
        self.exits += 1;
        let (set, kind) = self.script.pop_front().unwrap_or((vm_exit, ExitKind::Hypercall(HypercallInsn::Vmcall)));
        set(regs);
        Exit { kind, rip: self.rip, next_rip: self.rip + 2, raw: 0, tsc: rdtsc(), events }
    }
    /// A backend's fast loop (`vmm::fast`), over the script.
    fn run_fast(&mut self, regs: &mut GuestRegs, fast: &mut impl FastExits) -> Exit {
        loop {
            let exit = self.run(regs);
            let ExitKind::Hypercall(insn) = exit.kind else { return exit };
            if self.pending.is_some() || exit.events != ExitEvents::default() {
                return exit;
            }
            if !fast.hypercall(regs, insn, || self.cpl, exit.tsc) {
                return exit;
            }
            self.fast_answered += 1;
            self.rip = exit.next_rip;
        }
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
        if self.flat32 {
            0x11
        } else {
            0x8000_0011
        }
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
        self.cpl
    }
    fn segment(&self, _seg: SegReg) -> Segment {
        if self.flat32 {
            Segment { limit: 0xFFFF_FFFF, attr: SegAttr(SegAttr::DB | SegAttr::PRESENT), ..Segment::default() }
        } else {
            Segment::default()
        }
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
    fn interrupt_shadow(&self) -> bool {
        false
    }
    fn set_interrupt_window(&mut self, enable: bool) {
        self.window = enable;
    }
    fn set_exception_intercepts(&mut self, _vectors: u32) {}
    fn set_deadline(&mut self, _tsc: Option<u64>) {
        self.slow_passes += 1;
    }

    fn flush_guest_tlb(&mut self) {}

    fn set_cr2(&mut self, cr2: u64) {
        self.cr2 = cr2;
    }

    fn cr2(&self) -> u64 {
        self.cr2
    }
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
fn injections_are_logged_fresh_or_requeued_and_none_goes_to_a_masked_guest() {
    let no = AtomicBool::new(false);
    // Raised while the guest cannot take it: nothing injected, nothing logged as masked.
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rax = 0x41, TEST_IRQ_OUT), (|_| {}, ExitKind::Cpuid)]);
    m.interruptible = false;
    m.rflags &= !RFLAGS_IF;
    assert_eq!(vm.vcpus[0].lock().run(&vm, &mut m, u64::MAX, &no), SliceEnd::VmEnded);
    let v = vm.vcpus[0].lock();
    assert_eq!((v.injections().total, v.injections().masked), (0, 0));
    drop(v);
    // Injected with IF = 1; its delivery is interrupted by the next exit and re-queued,
    // then delivered.
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rax = 0x41, TEST_IRQ_OUT), (|_| {}, ExitKind::Cpuid), (|_| {}, ExitKind::Cpuid)]);
    m.interrupt_delivery = true;
    let mut v = vm.vcpus[0].lock();
    let end = v.run(&vm, &mut m, u64::MAX, &no);
    assert_eq!(end, SliceEnd::VmEnded);
    assert_eq!(m.injected, [Event::Interrupt { vector: 0x41 }]);
    let log: Vec<_> = v.injections().iter().copied().collect();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].origin, injections::Origin::Fresh);
    assert_eq!(log[1].origin, injections::Origin::Requeue);
    for i in &log {
        assert_eq!(i.event, Event::Interrupt { vector: 0x41 });
        assert!(i.if_on && !i.shadow);
    }
    assert_eq!((v.injections().total, v.injections().masked), (2, 0));
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

/// The (size, value) of every write a [`Recorder`] saw.
type Writes = alloc::sync::Arc<spin::Mutex<Vec<(u8, u64)>>>;

/// A port device that records what is written and reads back a counter.
struct Recorder {
    written: Writes,
    next: u64,
}

impl crate::devices::bus::Device for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn read(&mut self, _addr: u64, _size: u8, _cx: &crate::devices::bus::Ctx<'_>) -> u64 {
        self.next += 1;
        self.next
    }
    fn write(&mut self, _addr: u64, size: u8, value: u64, _cx: &crate::devices::bus::Ctx<'_>) -> BusEffect {
        self.written.lock().push((size, value));
        if value == 0xF4 {
            BusEffect::Exit(0xF4 * 2 + 1)
        } else {
            BusEffect::None
        }
    }
}

/// A 1-vCPU VM starting at 0x1000 with a [`Recorder`] at port 0x80.
fn recorder_vm() -> (Vm, Writes) {
    let mut frames = FrameAllocator::for_tests();
    let mem = GuestMemory::for_tests(&mut frames);
    let irq = Interrupts::new(1, false, DEFAULT_TIMER_HZ, count_kick);
    let written = alloc::sync::Arc::new(spin::Mutex::new(Vec::new()));
    let mut bus = Bus::new();
    let dev = crate::devices::bus::device(Recorder { written: written.clone(), next: 0 });
    bus.add(dev, &[crate::devices::bus::Range::port(0x80, 1)]).unwrap();
    let boot = CpuState { rip: 0x1000, ..CpuState::reset() };
    let vcpus = alloc::vec![Vcpu::new(0, Some(boot), false).unwrap()];
    (Vm::new("t", mem, bus, irq, vcpus, false, true), written)
}

const fn string_io(size: u8, write: bool) -> ExitKind {
    ExitKind::Io(IoAccess { port: 0x80, size, write, string: true, rep: true })
}

#[test]
fn rep_outsb_sends_each_byte_and_advances() {
    let (vm, written) = recorder_vm();
    vm.mem.write(0x1000, &[0xF3, 0x6E]).unwrap(); // rep outsb
    vm.mem.write(0x3000, b"hello").unwrap();
    let mut m = Mock::new(&[(
        |r| {
            r.rsi = 0x3000;
            r.rcx = 5;
        },
        string_io(1, true),
    )]);
    m.flat32 = true;
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    let bytes: Vec<u8> = written.lock().iter().map(|(s, v)| if *s == 1 { *v as u8 } else { 0 }).collect();
    assert_eq!(bytes, b"hello");
    let regs = vm.vcpus[0].lock().regs;
    assert_eq!((regs.rsi, regs.rcx), (0x3005, 0));
    assert_eq!(m.rip, 0x1002, "RIP past the 2-byte instruction");
}

#[test]
fn rep_insw_fills_memory_downwards_in_batches() {
    let (vm, _) = recorder_vm();
    vm.mem.write(0x1000, &[0x66, 0xF3, 0x6D]).unwrap(); // rep insw (32-bit code)
    let count = 5000u64;
    let mut m = Mock::new(&[
        (
            |r| {
                r.rdi = 0x10_0000;
                r.rcx = 5000;
            },
            string_io(2, false),
        ),
        (|_| {}, string_io(2, false)),
    ]);
    m.flat32 = true;
    m.rflags |= RFLAGS_DF;
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    let regs = vm.vcpus[0].lock().regs;
    assert_eq!(regs.rcx, 0);
    assert_eq!(regs.rdi, 0x10_0000 - 2 * count);
    assert_eq!(m.rip, 0x1003, "the second exit finished the REP");
    // The first element went to 0x100000, the last to 0x100000 - 2 * 4999.
    let mut w = [0u8; 2];
    vm.mem.read(0x10_0000, &mut w).unwrap();
    assert_eq!(u16::from_le_bytes(w), 1);
    vm.mem.read(0x10_0000 - 2 * (count - 1), &mut w).unwrap();
    assert_eq!(u16::from_le_bytes(w), count as u16);
    assert_eq!(vm.counters[0].exits.snapshot().total().count, 3, "two string I/O exits and the final hypercall");
}

#[test]
fn a_string_write_to_a_debug_exit_ends_the_vm_with_its_status() {
    let (vm, written) = recorder_vm();
    vm.mem.write(0x1000, &[0x6E]).unwrap(); // outsb
    vm.mem.write(0x3000, &[0xF4]).unwrap();
    let mut m = Mock::new(&[(
        |r| r.rsi = 0x3000,
        ExitKind::Io(IoAccess { port: 0x80, size: 1, write: true, string: true, rep: false }),
    )]);
    m.flat32 = true;
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(vm.outcome().map(|o| o.0), Some(VmOutcome::Exited { status: 0x1E9 }));
    assert_eq!(written.lock().len(), 1);
}

#[test]
fn string_io_on_a_not_present_page_is_a_page_fault() {
    let (vm, written) = recorder_vm();
    // rep outsb (16-bit code, PAE paging). PAE tables (the mock's CR3 is 0): PDPTE 0 -> PD at
    // 0x5000 -> PT at 0x6000, which maps the code page 0x1000 only; the string at 0x3000 is on
    // a not-present page.
    vm.mem.write(0x1000, &[0xF3, 0x6E]).unwrap();
    vm.mem.write_u64(0, 0x5000 | 1).unwrap();
    vm.mem.write_u64(0x5000, 0x6000 | 1).unwrap();
    vm.mem.write_u64(0x6000 + 8, 0x1000 | 1).unwrap();
    let mut m = Mock::new(&[(
        |r| {
            r.rsi = 0x3000;
            r.rcx = 5;
        },
        string_io(1, true),
    )]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(
        m.injected.first(),
        Some(&Event::Exception { vector: VECTOR_PF, error_code: Some(0) }),
        "a read at CPL 0"
    );
    assert_eq!(m.cr2, 0x3000);
    assert!(written.lock().is_empty());
    let regs = vm.vcpus[0].lock().regs;
    assert_eq!((regs.rsi, regs.rcx), (0x3000, 5), "nothing done");
    assert_eq!(m.rip, 0x1000, "RIP on the faulting instruction");
    assert!(matches!(vm.outcome().map(|o| o.0), Some(VmOutcome::Exited { .. })), "the VM went on");
}

#[test]
fn a_string_io_exit_that_is_no_string_instruction_is_fatal() {
    let (vm, _) = recorder_vm();
    vm.mem.write(0x1000, &[0x90, 0x90]).unwrap();
    let mut m = Mock::new(&[(|_| {}, string_io(1, true))]);
    m.flat32 = true;
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert!(matches!(vm.outcome().map(|o| o.0), Some(VmOutcome::Fatal { .. })));
}

#[test]
fn pmu_counts_exits_and_an_overflow_raises_an_nmi_through_the_lvtpc() {
    use crate::pmu::{amd, Access, COUNTER_MASK};
    let vm = test_vm(2);
    vm.vcpus[0].lock().set_pmu(true);
    let mut m = Mock::new(&[
        (|r| wrmsr(r, 0x1B, X2APIC_ON), ExitKind::Wrmsr),
        (|r| wrmsr(r, 0x80F, 0x1FF), ExitKind::Wrmsr),
        // LVT performance counter: NMI (what Linux programs).
        (|r| wrmsr(r, 0x834, 4 << 8), ExitKind::Wrmsr),
        // PERF_CTR0 three events short of wrapping; PERF_CTL0 counts every exit, with INT.
        (|r| wrmsr(r, amd::PERF_CTL_BASE + 1, COUNTER_MASK - 2), ExitKind::Wrmsr),
        (|r| wrmsr(r, amd::PERF_CTL_BASE, 1 << 22 | 3 << 16 | 1 << 20 | 0x56), ExitKind::Wrmsr),
        (|r| r.rax = 0, ExitKind::Cpuid),
        (|r| r.rax = 0, ExitKind::Cpuid),
        (|r| r.rax = 0, ExitKind::Cpuid),
        (|r| r.rcx = 0, ExitKind::Rdpmc),
        (|r| r.rcx = 6, ExitKind::Rdpmc),
    ]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.injected, [Event::Nmi, Event::GP0], "the PMI as NMI, then #GP for an absent counter");
    let v = vm.vcpus[0].lock();
    // Wrapped at the third CPUID exit; then the two RDPMC exits and the final hypercall.
    assert_eq!(v.pmu().read(amd::PERF_CTL_BASE + 1), Access::Ok(3));
    assert_eq!(v.pmu().pmis, 1);
    // AMD leaves the LVT entry unmasked.
    assert_eq!(vm.irq.apic(0).lapic.lock().lvt(crate::devices::lapic::Lvt::Perf), 4 << 8);
    // The other vCPU has its own PMU, off.
    assert_eq!(vm.vcpus[1].lock().pmu().read(amd::PERF_CTL_BASE + 1), Access::NotPmu);
}

#[test]
fn pmu_off_leaves_its_msrs_unknown_and_rdpmc_faults() {
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rcx = 0xC001_0201, ExitKind::Rdmsr), (|r| r.rcx = 0, ExitKind::Rdpmc)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.injected, [Event::GP0, Event::GP0]);
}

fn ping_7(r: &mut GuestRegs) {
    r.rax = nr::PING;
    r.rbx = 7;
}

fn version(r: &mut GuestRegs) {
    r.rax = nr::VERSION;
}

const VMCALL: ExitKind = ExitKind::Hypercall(HypercallInsn::Vmcall);

#[test]
fn the_fast_path_answers_ping_in_the_backend_loop_and_counts_it() {
    let vm = test_vm(1);
    let mut m = Mock::new(&[(ping_7, VMCALL), (ping_7, VMCALL), (ping_7, VMCALL), (version, VMCALL), (ping_7, VMCALL)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    // VERSION is the run loop's (as is the VM_EXIT that ends the script); the PING after it
    // is answered in the next entry's loop.
    assert_eq!(m.fast_answered, 4);
    let hypercalls = vm.counters[0].exits.snapshot().classes()[VMCALL.index()];
    assert_eq!(hypercalls.count, 6, "every hypercall counted, answered in the loop or not");
    assert_eq!(m.rip, 0x1000 + 2 * 5, "each answered call advanced RIP");
    assert_eq!(vm.outcome(), Some((VmOutcome::Exited { status: 0 }, 0)));
}

#[test]
fn the_fast_path_leaves_to_the_run_loop_what_it_must_see() {
    // CPL 3: the run loop answers -EPERM (the fast path answers only what it would answer
    // the same way).
    let vm = test_vm(1);
    let mut m = Mock { cpl: 3, rflags: RFLAGS_RESERVED_1, ..Mock::new(&[(ping_7, VMCALL), (|_| {}, ExitKind::Hlt)]) };
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded, "HLT with interrupts off ends the VM");
    assert_eq!(m.fast_answered, 0);
    assert_eq!(vm.vcpus[0].lock().regs.rax, (-guest_abi::hypercall::errno::EPERM) as u64);
    // An argument whose answer depends on the guest's mode, and a slice already over.
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| (r.rax, r.rbx) = (nr::PING, u64::from(u32::MAX)), VMCALL)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.fast_answered, 0);
    let vm = test_vm(1);
    let mut m = Mock::new(&[(ping_7, VMCALL), (ping_7, VMCALL)]);
    let slice = vm.vcpus[0].lock().run(&vm, &mut m, 0, &AtomicBool::new(false));
    assert_eq!((slice, m.fast_answered), (SliceEnd::Preempted, 0));
    assert_eq!(vm.counters[0].exits.snapshot().classes()[VMCALL.index()].count, 1);
}

/// An OUT of one byte to `port` (the value is the guest's AL).
const fn outb(port: u16) -> ExitKind {
    ExitKind::Io(IoAccess { port, size: 1, write: true, string: false, rep: false })
}

/// A 1-vCPU PC-style VM in PIC mode (no local APICs) with the 8259 pair and COM1 on the bus.
fn uart_vm() -> Vm {
    let mut frames = FrameAllocator::for_tests();
    let mem = GuestMemory::for_tests(&mut frames);
    let irq = Interrupts::new(1, false, DEFAULT_TIMER_HZ, count_kick);
    let mut bus = Bus::new();
    let pic = crate::devices::bus::device(crate::devices::irqchip::PicPorts(irq.clone()));
    bus.add(pic, &[crate::devices::bus::Range::port(0x20, 2), crate::devices::bus::Range::port(0xA0, 2)]).unwrap();
    let line = crate::devices::irqchip::IrqLine::new(irq.clone(), 4);
    let uart = crate::devices::uart::ConsoleUart::new(0x3F8, line, "t");
    let ranges = uart.ranges();
    bus.add(crate::devices::bus::device(uart), &ranges).unwrap();
    let boot = CpuState { rip: 0x1000, ..CpuState::reset() };
    let vcpus = alloc::vec![Vcpu::new(0, Some(boot), false).unwrap()];
    Vm::new("t", mem, bus, irq, vcpus, false, true)
}

#[test]
fn port_io_on_the_bus_reenters_at_once_and_an_interrupt_it_raises_goes_in_at_the_next_entry() {
    let vm = uart_vm();
    let mut m = Mock::new(&[
        // The master PIC: ICW1-ICW4 (vectors 0x20..), then only IRQ 4 unmasked.
        (|r| r.rax = 0x11, outb(0x20)),
        (|r| r.rax = 0x20, outb(0x21)),
        (|r| r.rax = 0x04, outb(0x21)),
        (|r| r.rax = 0x01, outb(0x21)),
        (|r| r.rax = 0xEF, outb(0x21)),
        // COM1: OUT2 (the IRQ gate), two bytes, an LSR read; no interrupt enabled yet.
        (|r| r.rax = 0x08, outb(0x3FC)),
        (|r| r.rax = u64::from(b'h'), outb(0x3F8)),
        (|r| r.rax = u64::from(b'i'), outb(0x3F8)),
        (|r| r.rax = 0xFF00, ExitKind::Io(IoAccess { port: 0x3FD, size: 1, write: false, string: false, rep: false })),
    ]);
    // Then IER.ETBEI: the THRE latch raises IRQ 4 at once.
    m.script.push_back((|r| r.rax = 0x02, outb(0x3F9)));
    m.script.push_back((|_| {}, ExitKind::Cpuid));
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    // The run loop's per-entry work ran before the first entry, then not again until the
    // interrupt the IER write raised (vector 0x24), which went in at the very next entry.
    assert_eq!(m.injected, [Event::Interrupt { vector: 0x24 }]);
    assert_eq!(m.injected_after, [10], "injected at the entry after the 10th exit (the IER write)");
    assert_eq!(m.slow_passes, 2, "before the first entry and after the IER write");
    let io = vm.counters[0].exits.snapshot().classes()[outb(0x3F8).index()];
    assert_eq!(io.count, 10, "every port I/O exit counted");
}

#[test]
fn port_io_to_vireos_own_ports_goes_through_the_run_loop() {
    // The test interrupt port is Vireo's (no device on the bus): its timer must reach the
    // fast path's deadline, so the next entry is the slow path's.
    let vm = test_vm(1);
    let mut m = Mock::new(&[(|r| r.rax = 0x40 | (0xFF_FFFF << 8), TEST_IRQ_OUT), (|_| {}, ExitKind::Cpuid)]);
    assert_eq!(run(&vm, 0, &mut m), SliceEnd::VmEnded);
    assert_eq!(m.slow_passes, 2, "before the first entry and after the OUT (not after the CPUID)");
}
