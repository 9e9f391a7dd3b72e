//! A VM and the one run loop both vendors share: "what happens on a CPUID exit" (and every
//! other exit) is decided here, once, in `Vm::handle`.

use alloc::string::String;

use super::{
    backend::Backend,
    cpuid::{self, CpuidContext},
    exit::{merge, Event, Exit, ExitKind, IoAccess, Merge, NptAccess, VECTOR_DF, VECTOR_UD},
    guest_mem::GuestMemory,
    hypercall, mmio, msr,
    regs::GuestRegs,
    state::{SegAttr, SegReg, CR4_OSXSAVE, EFER_LMA, RFLAGS_IF},
    stats::ExitStats,
    walk::{self, GuestPaging},
};
use crate::{
    arch::{
        fpu::{self, FpuState},
        tsc,
    },
    devices::{
        console::{print_line, GuestConsole},
        pc::{PcPlatform, PortEffect as PcEffect},
        ports::{self, PortEffect},
        testdev::{IrqRequest, TestDevice},
        time::Nanos,
    },
};

/// How a VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest asked to end (hypercall `VM_EXIT`) with this status.
    Exited { status: u64 },
    /// The guest triple-faulted: the machine would reset; Vireo ends the VM.
    TripleFault,
    /// The vCPU halted with nothing that could ever wake it.
    Halted,
    /// Vireo could not go on with this guest (reason says why); the guest is stopped,
    /// Vireo and other VMs go on.
    Fatal { reason: &'static str },
    /// The VM ran out of its time limit (`timeout=` on its module line).
    TimedOut,
    /// The guest powered its machine off (ACPI S5).
    PoweredOff,
    /// The guest reset its machine (reset register, keyboard controller); VM restart is not
    /// implemented, so the VM ends.
    Reset,
}

/// What the dispatch decided.
enum Flow {
    Continue,
    Stop(VmOutcome),
}

/// Exits remembered for crash reports ("the exit that led there").
const HISTORY: usize = 8;

pub struct Vm {
    pub name: String,
    pub mem: GuestMemory,
    pub stats: ExitStats,
    pub regs: GuestRegs,
    console: GuestConsole,
    testdev: TestDevice,
    pending_irq: Option<u8>,
    /// (TSC deadline, vector) of a delayed test interrupt.
    timer: Option<(u64, u8)>,
    msrs: msr::MsrState,
    fpu: FpuState,
    native_vmmcall: bool,
    history: [Option<Exit>; HISTORY],
    history_next: usize,
    unassigned_reported: u32,
    /// TSC at which the VM's time limit ends.
    pub deadline: Option<u64>,
    /// TSC deadline the host timer is armed for.
    armed: Option<u64>,
    /// The PC platform of a Linux VM (test guests have none).
    pub platform: Option<PcPlatform>,
    /// TSC when the VM started: guest time zero for the platform's devices.
    start_tsc: u64,
    /// TSC of the last poll of Vireo's console for input to this VM.
    input_polled: u64,
}

/// Moves bytes typed on Vireo's console into the VM's UART (the VM that runs has the
/// console's focus), at most every millisecond (`last_poll`, in TSC ticks) so the host UART
/// is not polled on every exit.
fn poll_console_input(last_poll: &mut u64, platform: &mut PcPlatform) {
    let now = rdtsc();
    if now.wrapping_sub(*last_poll) < tsc::hz() / 1000 {
        return;
    }
    *last_poll = now;
    while platform.uart.rx_space() > 0 {
        let Some(byte) = crate::console::serial::try_read_byte() else { break };
        platform.uart.push_input(byte);
    }
}

/// Reads the TSC.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged here (CR4.TSD clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl Vm {
    /// `native_vmmcall`: the CPU is AMD (VMMCALL is its native hypercall instruction).
    pub fn new(name: &str, mem: GuestMemory, native_vmmcall: bool) -> Option<Self> {
        Some(Self {
            name: String::from(name),
            mem,
            stats: ExitStats::new(),
            regs: GuestRegs::default(),
            console: GuestConsole::default(),
            testdev: TestDevice::default(),
            pending_irq: None,
            timer: None,
            msrs: msr::MsrState::new(!native_vmmcall),
            fpu: FpuState::new()?,
            native_vmmcall,
            history: [None; HISTORY],
            history_next: 0,
            unassigned_reported: 0,
            deadline: None,
            armed: None,
            platform: None,
            start_tsc: rdtsc(),
            input_polled: 0,
        })
    }

    /// The most recent exits, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Exit> + '_ {
        (0..HISTORY).filter_map(move |i| self.history[(self.history_next + i) % HISTORY].as_ref())
    }

    /// Runs the vCPU until the VM ends.
    pub fn run<B: Backend>(&mut self, cpu: &mut B) -> VmOutcome {
        self.fpu.restore();
        // #UD is intercepted so the other vendor's hypercall instruction works too.
        cpu.set_exception_intercepts(1 << VECTOR_UD);
        let outcome = loop {
            self.deliver_events(cpu);
            self.arm_host_timer();
            let exit = cpu.run(&mut self.regs);
            if exit.kind == ExitKind::ExternalInterrupt {
                // The one-shot host timer (or another interrupt) fired: re-arm if needed.
                self.armed = None;
            }
            self.history[self.history_next] = Some(exit);
            self.history_next = (self.history_next + 1) % HISTORY;
            let flow = match self.deadline {
                Some(d) if exit.tsc >= d => Flow::Stop(VmOutcome::TimedOut),
                _ => self.handle(cpu, &exit),
            };
            self.stats.record(&exit.kind, rdtsc().wrapping_sub(exit.tsc));
            if let Flow::Stop(outcome) = flow {
                break outcome;
            }
        };
        self.console.flush(&mut |l| print_line(&self.name, l));
        crate::arch::lapic::disarm();
        self.armed = None;
        self.fpu.save();
        outcome
    }

    /// Guest time: nanoseconds since the VM started.
    fn now(&self) -> Nanos {
        Nanos(tsc::to_nanos(rdtsc().wrapping_sub(self.start_tsc)))
    }

    /// TSC value at guest time `t`.
    fn tsc_at(&self, t: Nanos) -> u64 {
        self.start_tsc.saturating_add(tsc::from_nanos(t.0))
    }

    /// Keeps the host's one-shot timer at the earliest moment Vireo must regain control
    /// from a guest that does not exit by itself: the VM's time limit or a device timer.
    fn arm_host_timer(&mut self) {
        // The self-test device's timer is deliberately left out: it fires at the guest's next
        // exit or HLT after its delay (guest-abi), which keeps `sti; hlt` tests deterministic.
        // (QEMU TCG was seen reporting an open interrupt window between STI and HLT after a
        // physical-interrupt exit inside the STI shadow.)
        let device = self.platform.as_ref().and_then(|p| p.next_deadline()).map(|t| self.tsc_at(t));
        let want = [self.deadline, device].into_iter().flatten().min();
        if want != self.armed {
            match want {
                Some(t) => crate::arch::lapic::arm(t),
                None => crate::arch::lapic::disarm(),
            }
            self.armed = want;
        }
    }

    /// Injects a pending interrupt if the guest can take it, else asks for a window.
    fn deliver_events<B: Backend>(&mut self, cpu: &mut B) {
        if let Some((deadline, vector)) = self.timer {
            if rdtsc() >= deadline {
                self.pending_irq = Some(vector);
                self.timer = None;
            }
        }
        let now = self.now();
        if let Some(platform) = self.platform.as_mut() {
            poll_console_input(&mut self.input_polled, platform);
            platform.update(now);
            if platform.pending_interrupt().is_some() && !cpu.event_pending() {
                if cpu.interruptible() {
                    if let Some(vector) = platform.acknowledge() {
                        cpu.inject(Event::Interrupt { vector });
                    }
                    cpu.set_interrupt_window(false);
                } else {
                    cpu.set_interrupt_window(true);
                }
            }
        }
        let Some(vector) = self.pending_irq else { return };
        if cpu.event_pending() {
            return;
        }
        if cpu.interruptible() {
            cpu.inject(Event::Interrupt { vector });
            self.pending_irq = None;
            cpu.set_interrupt_window(false);
        } else {
            cpu.set_interrupt_window(true);
        }
    }

    /// The one exit dispatch.
    fn handle<B: Backend>(&mut self, cpu: &mut B, exit: &Exit) -> Flow {
        match exit.kind {
            ExitKind::Cpuid => {
                let (leaf, subleaf) = (self.regs.rax as u32, self.regs.rcx as u32);
                let ctx = CpuidContext {
                    osxsave: cpu.cr4() & CR4_OSXSAVE != 0,
                    apic_id: 0,
                    native_vmmcall: self.native_vmmcall,
                    tsc_khz: tsc::hz() / 1000,
                    apic: self.platform.as_ref().is_some_and(|p| p.apic.is_some()),
                };
                let r = cpuid::filter(leaf, subleaf, cpuid::host(leaf, subleaf), &ctx);
                self.regs.rax = r.eax as u64;
                self.regs.rbx = r.ebx as u64;
                self.regs.rcx = r.ecx as u64;
                self.regs.rdx = r.edx as u64;
                cpu.set_rip(exit.next_rip);
            }
            ExitKind::Rdmsr => {
                let msr_index = self.regs.rcx as u32;
                let now = self.now();
                let apic = self.platform.as_mut().and_then(|p| p.msr_read(msr_index, now));
                let outcome = match msr_index {
                    _ if apic.is_some() => match apic {
                        Some(Ok(v)) => msr::MsrOutcome::Ok(v),
                        _ => msr::MsrOutcome::Fault,
                    },
                    msr::IA32_EFER => msr::MsrOutcome::Ok(cpu.efer()),
                    msr::IA32_PAT => msr::MsrOutcome::Ok(cpu.pat()),
                    _ => msr::read(&self.msrs, msr_index, rdtsc()),
                };
                match outcome {
                    msr::MsrOutcome::Ok(v) => {
                        self.regs.rax = v & 0xFFFF_FFFF;
                        self.regs.rdx = v >> 32;
                        cpu.set_rip(exit.next_rip);
                    }
                    msr::MsrOutcome::Fault => cpu.inject(Event::GP0),
                }
            }
            ExitKind::Wrmsr => {
                let msr_index = self.regs.rcx as u32;
                let value = (self.regs.rdx << 32) | (self.regs.rax & 0xFFFF_FFFF);
                let now = self.now();
                // A TSC_DEADLINE value is a TSC reading (the guest runs on the host TSC).
                let at = Nanos(tsc::to_nanos(value.saturating_sub(self.start_tsc)));
                let apic = self.platform.as_mut().and_then(|p| p.msr_write(msr_index, value, at, now));
                let outcome = match msr_index {
                    _ if apic.is_some() => match apic {
                        Some(Ok(())) => msr::MsrOutcome::Ok(value),
                        _ => msr::MsrOutcome::Fault,
                    },
                    msr::IA32_EFER => {
                        let r = msr::write_efer(cpu.efer(), value, cpu.cr0());
                        if let msr::MsrOutcome::Ok(efer) = r {
                            cpu.set_efer(efer);
                        }
                        r
                    }
                    msr::IA32_PAT if msr::valid_pat(value) => {
                        cpu.set_pat(value);
                        msr::MsrOutcome::Ok(value)
                    }
                    msr::IA32_PAT => msr::MsrOutcome::Fault,
                    _ => msr::write(&mut self.msrs, msr_index, value),
                };
                match outcome {
                    msr::MsrOutcome::Ok(_) => cpu.set_rip(exit.next_rip),
                    msr::MsrOutcome::Fault => cpu.inject(Event::GP0),
                }
            }
            ExitKind::Io(io) => return self.port_io(cpu, io, exit),
            ExitKind::Hypercall(_) => return self.hypercall(cpu, exit.next_rip),
            ExitKind::Hlt => {
                cpu.set_rip(exit.next_rip);
                return self.halt(cpu);
            }
            ExitKind::Xsetbv => self.xsetbv(cpu, exit),
            ExitKind::NestedPageFault(access) => return self.unassigned_access(cpu, access, exit),
            ExitKind::Exception { vector: VECTOR_UD, .. } => {
                // The other vendor's hypercall instruction faults with #UD: accept it.
                let mut insn = [0u8; 3];
                if self.fetch(cpu, exit.rip, &mut insn) == 3 && matches!(insn, [0x0F, 0x01, 0xC1] | [0x0F, 0x01, 0xD9])
                {
                    return self.hypercall(cpu, exit.rip.wrapping_add(3));
                }
                return self.reflect(cpu, VECTOR_UD, None);
            }
            ExitKind::Exception { vector, error_code } => return self.reflect(cpu, vector, error_code),
            ExitKind::TripleFault => return Flow::Stop(VmOutcome::TripleFault),
            // Nothing routes physical interrupts or NMIs to Vireo yet; the exit itself is
            // all that was needed.
            ExitKind::ExternalInterrupt | ExitKind::Nmi | ExitKind::Pause | ExitKind::ControlRegister => {}
            ExitKind::InterruptWindow => cpu.set_interrupt_window(false),
            ExitKind::Init | ExitKind::Sipi { .. } => {
                log::warn!("vm {}: INIT/SIPI ignored (single-vCPU VM)", self.name);
            }
            ExitKind::EntryFailed { reason, .. } => return Flow::Stop(VmOutcome::Fatal { reason }),
            ExitKind::Unhandled => return Flow::Stop(VmOutcome::Fatal { reason: "exit Vireo does not handle" }),
        }
        Flow::Continue
    }

    /// Delivers an intercepted exception to the guest. If the exit interrupted the delivery
    /// of another event, the two combine as the CPU would combine them (#DF, or shutdown);
    /// an interrupted external interrupt is kept pending and delivered after.
    fn reflect<B: Backend>(&mut self, cpu: &mut B, vector: u8, error_code: Option<u32>) -> Flow {
        if let Some(first) = cpu.pending_event() {
            match merge(first, vector) {
                Merge::TripleFault => return Flow::Stop(VmOutcome::TripleFault),
                Merge::DoubleFault => {
                    cpu.inject(Event::Exception { vector: VECTOR_DF, error_code: Some(0) });
                    return Flow::Continue;
                }
                Merge::Serial => {
                    if let Event::Interrupt { vector } = first {
                        self.pending_irq = Some(vector);
                    }
                }
            }
        }
        cpu.inject(Event::Exception { vector, error_code });
        Flow::Continue
    }

    fn port_io<B: Backend>(&mut self, cpu: &mut B, io: IoAccess, exit: &Exit) -> Flow {
        if io.string {
            return Flow::Stop(VmOutcome::Fatal { reason: "string port I/O is not emulated yet" });
        }
        let mask = match io.size {
            1 => 0xFF,
            2 => 0xFFFF,
            _ => 0xFFFF_FFFF,
        };
        let now = self.now();
        if let Some(platform) = self.platform.as_mut() {
            let value = (self.regs.rax & mask) as u32;
            let handled = if io.write {
                platform.write(io.port, io.size, value, now).map(Some)
            } else {
                platform.read(io.port, io.size, now).map(|v| {
                    let v = v as u64;
                    self.regs.rax = if io.size == 4 { v } else { (self.regs.rax & !mask) | (v & mask) };
                    None
                })
            };
            match handled {
                Some(Some(PcEffect::ConsoleByte(b))) => {
                    let name = &self.name;
                    self.console.push(&[b], &mut |l| print_line(name, l));
                }
                Some(Some(PcEffect::PowerOff)) => return Flow::Stop(VmOutcome::PoweredOff),
                Some(Some(PcEffect::Reset)) => return Flow::Stop(VmOutcome::Reset),
                Some(_) => {}
                None => return self.simple_port_io(cpu, io, exit, mask),
            }
            cpu.set_rip(exit.next_rip);
            return Flow::Continue;
        }
        self.simple_port_io(cpu, io, exit, mask)
    }

    /// Ports outside any platform device: Vireo's debug console and test devices; the
    /// rest behave like an empty ISA bus.
    fn simple_port_io<B: Backend>(&mut self, cpu: &mut B, io: IoAccess, exit: &Exit, mask: u64) -> Flow {
        if io.write {
            match ports::write(io.port, io.size, (self.regs.rax & mask) as u32) {
                PortEffect::ConsoleByte(b) => {
                    let name = &self.name;
                    self.console.push(&[b], &mut |l| print_line(name, l));
                }
                PortEffect::TestDevice(v) => self.testdev.write(v),
                PortEffect::TestIrq(v) => match IrqRequest::decode(v) {
                    Some(IrqRequest { vector, delay_tsc: 0 }) => self.pending_irq = Some(vector),
                    Some(IrqRequest { vector, delay_tsc }) => self.timer = Some((rdtsc() + delay_tsc, vector)),
                    None => {}
                },
                PortEffect::None => {}
            }
        } else {
            let v = ports::read(io.port, io.size, self.testdev.read()) as u64;
            // IN AL/AX keeps the other bits; IN EAX zero-extends into RAX.
            self.regs.rax = if io.size == 4 { v } else { (self.regs.rax & !mask) | (v & mask) };
        }
        cpu.set_rip(exit.next_rip);
        Flow::Continue
    }

    fn hypercall<B: Backend>(&mut self, cpu: &mut B, next_rip: u64) -> Flow {
        // Outside 64-bit mode only the low 32 bits of each register count.
        let long = cpu.long_mode();
        let t = |v: u64| if long { v } else { v & 0xFFFF_FFFF };
        let r = self.regs;
        let (number, args) = (t(r.rax), [t(r.rbx), t(r.rcx), t(r.rdx), t(r.rsi)]);
        let (name, console) = (&self.name, &mut self.console);
        let mut out = |bytes: &[u8]| console.push(bytes, &mut |l| print_line(name, l));
        let mut cx = hypercall::Context { mem: &mut self.mem, stats: &self.stats, console: &mut out };
        match hypercall::handle(number, args, cpu.cpl(), &mut cx) {
            hypercall::Outcome::Return(v) => {
                self.regs.rax = t(v as u64);
                cpu.set_rip(next_rip);
                Flow::Continue
            }
            hypercall::Outcome::Exit(status) => Flow::Stop(VmOutcome::Exited { status }),
        }
    }

    /// HLT (RIP already past it): wait for the next interrupt the guest can take.
    fn halt<B: Backend>(&mut self, cpu: &mut B) -> Flow {
        let can_take = cpu.rflags() & RFLAGS_IF != 0;
        if !can_take {
            // Only an NMI or INIT could wake it, and nothing sends those yet.
            return Flow::Stop(VmOutcome::Halted);
        }
        if self.pending_irq.is_some() {
            return Flow::Continue;
        }
        if self.platform.is_some() {
            // Sleep until a device has an interrupt for the guest: a timer, or a key typed on
            // the console (a tickless guest waiting at its shell may have no timer at all);
            // or until the VM's time limit. An idle guest may be waiting at a prompt: show it.
            let name = &self.name;
            self.console.flush(&mut |l| print_line(name, l));
            loop {
                let now = self.now();
                let start = self.start_tsc;
                let Some(platform) = self.platform.as_mut() else { break };
                poll_console_input(&mut self.input_polled, platform);
                platform.update(now);
                let pending = platform.pending_interrupt().is_some();
                let until = platform.next_deadline().map(|t| start.saturating_add(tsc::from_nanos(t.0)));
                if pending {
                    return Flow::Continue;
                }
                // Re-check the console about every millisecond while no timer is due.
                let until = until.unwrap_or(u64::MAX).min(rdtsc().saturating_add(tsc::hz() / 1000));
                while rdtsc() < until {
                    if self.deadline.is_some_and(|d| rdtsc() >= d) {
                        return Flow::Stop(VmOutcome::TimedOut);
                    }
                    core::hint::spin_loop();
                }
            }
        }
        if let Some((deadline, vector)) = self.timer.take() {
            // The vCPU sleeps until its timer fires (the only vCPU on this CPU: wait here),
            // or until the VM's time limit.
            while rdtsc() < deadline {
                if self.deadline.is_some_and(|d| rdtsc() >= d) {
                    return Flow::Stop(VmOutcome::TimedOut);
                }
                core::hint::spin_loop();
            }
            self.pending_irq = Some(vector);
            return Flow::Continue;
        }
        Flow::Stop(VmOutcome::Halted)
    }

    fn xsetbv<B: Backend>(&mut self, cpu: &mut B, exit: &Exit) {
        if cpu.cr4() & CR4_OSXSAVE == 0 {
            cpu.inject(Event::UD);
            return;
        }
        let value = (self.regs.rdx << 32) | (self.regs.rax & 0xFFFF_FFFF);
        if cpu.cpl() != 0 || self.regs.rcx as u32 != 0 || !fpu::valid_xcr0(value, fpu::supported_xcr0()) {
            cpu.inject(Event::GP0);
            return;
        }
        // SAFETY: validated against the CPU's supported components; Vireo is soft-float,
        // so the guest's XCR0 can stay loaded while Vireo runs.
        unsafe { fpu::xsetbv(value) };
        self.fpu.xcr0 = value;
        cpu.set_rip(exit.next_rip);
    }

    /// Copies up to `buf.len()` instruction bytes at guest-virtual `rip`; returns how many
    /// could be read (stops at an unmapped page or the end of RAM).
    fn fetch<B: Backend>(&self, cpu: &B, rip: u64, buf: &mut [u8]) -> usize {
        let paging = GuestPaging { cr0: cpu.cr0(), cr3: cpu.cr3(), cr4: cpu.cr4(), efer: cpu.efer() };
        let mut done = 0;
        while done < buf.len() {
            let va = rip.wrapping_add(done as u64);
            let Ok(pa) = walk::translate(&self.mem, paging, va) else { break };
            let in_page = (0x1000 - (va & 0xFFF)) as usize;
            let n = in_page.min(buf.len() - done);
            if self.mem.read(pa, &mut buf[done..done + n]).is_err() {
                break;
            }
            done += n;
        }
        done
    }

    /// A guest access to guest-physical space with no RAM and no device: reads return all
    /// ones, writes are dropped (what an empty PC bus does), after decoding the instruction.
    fn unassigned_access<B: Backend>(&mut self, cpu: &mut B, access: NptAccess, exit: &Exit) -> Flow {
        if self.mem.contains(access.gpa, 1) {
            return Flow::Stop(VmOutcome::Fatal { reason: "nested page fault inside guest RAM" });
        }
        if access.fetch {
            return Flow::Stop(VmOutcome::Fatal { reason: "instruction fetch from guest-physical space with no RAM" });
        }
        let mut bytes = [0u8; 15];
        let n = self.fetch(cpu, exit.rip, &mut bytes);
        let cs = cpu.segment(SegReg::Cs);
        let bitness = if cpu.efer() & EFER_LMA != 0 && cs.attr.0 & SegAttr::LONG != 0 {
            64
        } else if cs.attr.0 & SegAttr::DB != 0 {
            32
        } else {
            16
        };
        let decoded = match mmio::decode(&bytes[..n], exit.rip, bitness, &self.regs) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("vm {}: at rip {:#x} gpa {:#x}: {e}", self.name, exit.rip, access.gpa);
                return Flow::Stop(VmOutcome::Fatal { reason: "cannot emulate the instruction of an MMIO access" });
            }
        };
        // A device there (local APIC, I/O APIC) answers; otherwise the empty bus does.
        let now = self.now();
        let (size, value) = match decoded.access {
            mmio::Access::Load { size, .. } => (size, None),
            mmio::Access::Store { size, value } => (size, Some(value as u32)),
        };
        let device = self.platform.as_mut().and_then(|p| p.mmio(access.gpa, size, value, now));
        if let mmio::Access::Load { size, dest } = decoded.access {
            mmio::complete_load(&mut self.regs, size, dest, device.map_or(u64::MAX, u64::from));
        }
        if device.is_none() && self.unassigned_reported < 4 {
            self.unassigned_reported += 1;
            log::info!(
                "vm {}: {} unassigned guest-physical {:#x} at rip {:#x}: {}",
                self.name,
                if access.write { "write to" } else { "read from" },
                access.gpa,
                exit.rip,
                if access.write { "dropped" } else { "reads all ones" }
            );
        }
        cpu.set_rip(exit.rip.wrapping_add(decoded.len as u64));
        Flow::Continue
    }
}
