//! A guest's local APIC (SDM Vol. 3A ch. 12 "Advanced Programmable Interrupt Controller"):
//! one vCPU's interrupt acceptance and priority logic, its LVT, its timer and its IPI
//! interface, as a pure state machine.
//!
//! Access paths (SDM §12.4.1, §12.12): in xAPIC mode the registers are 32 bits wide at 16-byte
//! strides in a 4 KiB MMIO page at the APIC base ([`LocalApic::mmio_read`],
//! [`LocalApic::mmio_write`], offsets as in SDM Table 12-1); in x2APIC mode they are the MSRs
//! `0x800 + (offset >> 4)` (SDM Table 12-6), the ICR is the single 64-bit MSR 0x830, the DFR
//! (0x80E), APR (0x809) and ICR high (0x831) do not exist, the ID and LDR are read-only and
//! the SELF IPI register (0x83F) is added ([`LocalApic::msr_read`], [`LocalApic::msr_write`]).
//! IA32_APIC_BASE (MSR 0x1B, SDM §12.4.4, §12.12.5) switches between the modes.
//!
//! Errors: every access the SDM makes raise #GP (x2APIC MSRs outside x2APIC mode, reserved
//! MSRs, RDMSR of write-only and WRMSR of read-only registers, reserved bits, illegal
//! IA32_APIC_BASE transitions) returns an [`ApicError`]; the caller injects #GP. The MMIO
//! page never faults: reserved registers read 0, ignore writes and set ESR bit 7 (illegal
//! register address), read-only registers ignore writes.
//!
//! Interrupts: [`LocalApic::set_irr`] accepts a fixed interrupt (from the IOAPIC, the PIC
//! through a caller, or the APIC itself); [`LocalApic::pending`] is the vector the vCPU would
//! take now (SDM §12.8.3.1: the highest IRR vector whose priority class is above the PPR's);
//! [`LocalApic::acknowledge`] is the INTA cycle. An EOI of a level-triggered vector (TMR set
//! at acceptance, SDM §12.8.4) queues the vector for [`LocalApic::eoi_broadcast_vector`] so
//! the caller can clear the IOAPIC's remote IRR. EOI-broadcast suppression is not offered.
//!
//! Timer (SDM §12.5.4): one-shot, periodic and TSC-deadline modes. The counting modes count at
//! `timer_hz / divide`, where `timer_hz` is a constructor parameter (the APIC "bus" or core
//! crystal clock; [`DEFAULT_TIMER_HZ`] is KVM's 1 GHz). Guests do not learn it from the APIC:
//! Linux calibrates the APIC timer against the PIT/HPET/PM timer (or reads it from CPUID 0x15
//! or a hypervisor leaf), or uses TSC-deadline mode when CPUID.1:ECX[24] says it exists. The
//! current count is a pure function of `now` (ticks counted exactly from the moment the
//! initial count or the divide configuration was last written). In TSC-deadline mode the
//! caller converts between TSC values and guest time: [`LocalApic::write_tsc_deadline`]
//! takes both the raw IA32_TSC_DEADLINE value (for read-back) and its time. Expiry sets the
//! timer vector in the IRR unless the LVT entry is masked; expiries while masked are lost;
//! several periodic expiries between two ticks coalesce into one IRR bit, as in hardware.
//!
//! IPIs (SDM §12.6): a write of the ICR low half (xAPIC, after the high half at 0x310 set the
//! destination), of the 64-bit x2APIC ICR (MSR 0x830), is decoded into an
//! [`irq::Message`] and queued for the owner, who collects it with [`LocalApic::take_ipi`]
//! and routes it to every addressed APIC ([`irq::route`], [`LocalApic::matches`]) — the
//! sender included, when it is addressed. Only the "self" shorthand with Fixed mode and the
//! x2APIC SELF IPI register (MSR 0x83F) are delivered into the own IRR at once, without a
//! message. Fixed/Lowest Priority IPIs with a vector below 16 set ESR bit 5 and are not
//! sent; reserved delivery modes (011b, 111b), non-Fixed modes with the self shorthand
//! (invalid, SDM Table 12-3) and messages beyond a full queue ([`IPI_QUEUE_LEN`]; the owner
//! drains it after every exit) are counted in [`LocalApic::ipis_dropped`]. The ICR's
//! delivery status always reads idle.
//!
//! Receiving ([`LocalApic::accept`]): Fixed and Lowest Priority set the IRR (TMR as the
//! message's trigger mode); NMI sets a flag for [`LocalApic::take_nmi`]; INIT resets the
//! APIC to its INIT state (SDM §12.4.7.3: like power-up, but the APIC ID, IA32_APIC_BASE
//! and the x2APIC mode are kept) and sets a flag for [`LocalApic::take_init`]; a non-BSP
//! APIC then waits for a STARTUP, whose vector [`LocalApic::take_sipi`] returns (the owner
//! starts the vCPU at `CpuState::sipi(vector)`). A STARTUP outside wait-for-SIPI is ignored
//! (SDM §9.4.4). The wait-for-SIPI state lives here ([`LocalApic::waiting_for_sipi`]): APs
//! (`bsp == false` at construction) start in it, as on a PC after the firmware's INIT; the
//! BSP never enters it (an INIT to the BSP is reported by `take_init` and the owner restarts
//! it at the reset vector). While waiting for SIPI, NMIs and SMIs are blocked (dropped); the
//! software-disabled APIC refuses fixed vectors anyway. INIT level de-assert and SMI are
//! ignored; ExtINT sets a flag for [`LocalApic::take_extint`] (the owner acknowledges the
//! 8259). A hardware-disabled APIC matches no destination and so receives nothing.
//!
//! Simplifications: no arbitration priority (APR reads 0), no remote read, no CMCI LVT (the
//! version register says 6 LVT entries), thermal/performance/LINT LVT entries are stored but
//! never fire (the caller may consult [`LocalApic::lvt`], e.g. for LINT0 ExtINT), the ESR
//! reports only illegal vectors and register addresses, the BSP flag of IA32_APIC_BASE is
//! fixed at construction (writes to it are ignored).
//!
//! Time follows the device conventions of [`super::time`]: every access carries `now`, `now`
//! never goes backwards (a smaller value counts as the last one seen), and nothing panics on
//! any guest input.

use super::irq::{self, DeliveryMode, Destination, Message};
use super::time::{earliest, Nanos, NANOS_PER_SEC};

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE (the caller converts TSC values; see [`LocalApic::write_tsc_deadline`]).
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// The x2APIC MSR range (SDM Table 12-6).
pub const X2APIC_MSR_FIRST: u32 = 0x800;
pub const X2APIC_MSR_LAST: u32 = 0x8FF;
/// The APIC base address after reset.
pub const DEFAULT_APIC_BASE: u64 = 0xFEE0_0000;
/// The size of the xAPIC MMIO page.
pub const APIC_PAGE_SIZE: u64 = 0x1000;
/// IA32_APIC_BASE flags: bootstrap processor, x2APIC enable, APIC global enable.
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_EN: u64 = 1 << 11;
/// The version register: integrated APIC version 0x14, 6 LVT entries (max LVT index 5), no
/// EOI-broadcast suppression (bit 24 clear).
pub const APIC_VERSION: u32 = 0x0005_0014;
/// The default timer base frequency: 1 GHz, as KVM's APIC bus.
pub const DEFAULT_TIMER_HZ: u64 = 1_000_000_000;
/// The default MAXPHYADDR bounding the APIC base address.
pub const DEFAULT_PHYS_ADDR_BITS: u8 = 52;

/// Register byte offsets in the xAPIC page (SDM Table 12-1); the x2APIC MSR of a register
/// is `0x800 + (offset >> 4)`.
pub mod reg {
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const APR: u32 = 0x090;
    pub const PPR: u32 = 0x0A0;
    pub const EOI: u32 = 0x0B0;
    pub const RRD: u32 = 0x0C0;
    pub const LDR: u32 = 0x0D0;
    pub const DFR: u32 = 0x0E0;
    pub const SVR: u32 = 0x0F0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const CMCI: u32 = 0x2F0;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
    /// x2APIC only (MSR 0x83F).
    pub const SELF_IPI: u32 = 0x3F0;

    /// The x2APIC MSR of the register at `offset`.
    pub const fn msr(offset: u32) -> u32 {
        super::X2APIC_MSR_FIRST + (offset >> 4)
    }
}

/// The LVT entries, in register order (SDM Figure 12-8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lvt {
    Timer = 0,
    Thermal = 1,
    Perf = 2,
    Lint0 = 3,
    Lint1 = 4,
    Error = 5,
}

/// LVT mask bit (all entries).
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT delivery mode field (bits 10:8) values.
pub const DELIVERY_FIXED: u32 = 0;
pub const DELIVERY_NMI: u32 = 4;
pub const DELIVERY_EXTINT: u32 = 7;
/// LVT timer modes (bits 18:17).
pub const TIMER_ONE_SHOT: u32 = 0;
pub const TIMER_PERIODIC: u32 = 1;
pub const TIMER_TSC_DEADLINE: u32 = 2;

/// SVR: APIC software enable.
pub const SVR_ENABLE: u32 = 1 << 8;
/// SVR bits that hold state: vector, software enable, focus processor checking.
const SVR_WRITABLE: u32 = 0x3FF;

/// ESR bits (SDM Figure 12-9).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// Writable bits of each LVT entry: timer (vector, mask, mode), thermal and performance
/// (vector, delivery mode, mask), LINT0/1 (plus polarity and trigger mode), error (vector,
/// mask).
const LVT_WRITABLE: [u32; 6] = [0x600FF | LVT_MASKED, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF];
/// Defined bits of each LVT entry (writable plus read-only status bits: delivery status,
/// remote IRR); others are reserved (#GP in x2APIC mode).
const LVT_DEFINED: [u32; 6] = [0x710FF, 0x117FF, 0x117FF, 0x1F7FF, 0x1F7FF, 0x110FF];

/// ICR low fields (SDM Figure 12-12): vector 7:0, delivery mode 10:8, destination mode 11,
/// delivery status 12, level 14, trigger mode 15, destination shorthand 19:18.
const ICR_DELIVERY_MODE_SHIFT: u32 = 8;
const ICR_LOGICAL: u32 = 1 << 11;
const ICR_DELIVERY_STATUS: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
const ICR_SHORTHAND_SHIFT: u32 = 18;
/// Destination shorthand values (ICR bits 19:18).
const SHORTHAND_NONE: u32 = 0;
const SHORTHAND_SELF: u32 = 1;
const SHORTHAND_ALL_INCLUDING_SELF: u32 = 2;
/// The xAPIC ICR high half's destination field (bits 63:56 of the ICR).
const ICR_HIGH_XAPIC_DEST_SHIFT: u32 = 24;
/// How many sent IPIs wait for [`LocalApic::take_ipi`] at most; more are dropped (counted).
pub const IPI_QUEUE_LEN: usize = 8;
/// ICR low bits that are defined in x2APIC mode (vector, delivery mode, destination mode,
/// delivery status, level, trigger mode, shorthand).
const ICR_LOW_DEFINED: u32 = 0x000C_DFFF;

/// Why an APIC access faults. Every variant except [`ApicError::UnknownMsr`] means the guest
/// gets #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// Not an APIC MSR (neither IA32_APIC_BASE nor 0x800-0x8FF): the caller handles it.
    UnknownMsr,
    /// An x2APIC MSR accessed while the APIC is not in x2APIC mode (SDM §12.12.1.2).
    NotX2apic,
    /// A reserved MSR in the x2APIC range.
    ReservedRegister,
    /// RDMSR of a write-only register (EOI, SELF IPI).
    WriteOnly,
    /// WRMSR of a read-only register.
    ReadOnly,
    /// A write that sets reserved bits.
    ReservedBits,
    /// An IA32_APIC_BASE write that asks for an illegal mode transition (SDM §12.12.5).
    InvalidTransition,
}

impl ApicError {
    /// Whether the guest gets #GP for this access.
    pub fn is_gp(self) -> bool {
        self != ApicError::UnknownMsr
    }
}

/// A 256-bit vector bitmap as the APIC's 8 × 32-bit IRR/ISR/TMR registers.
type Bitmap = [u32; 8];

fn bit_get(map: &Bitmap, v: u8) -> bool {
    map[(v >> 5) as usize] & (1 << (v & 31)) != 0
}

fn bit_put(map: &mut Bitmap, v: u8, on: bool) {
    let word = &mut map[(v >> 5) as usize];
    if on {
        *word |= 1 << (v & 31);
    } else {
        *word &= !(1 << (v & 31));
    }
}

fn highest(map: &Bitmap) -> Option<u8> {
    (0..8).rev().find(|&i| map[i] != 0).map(|i| (i as u32 * 32 + 31 - map[i].leading_zeros()) as u8)
}

/// The divisor of a divide configuration value (bits 0, 1 and 3; SDM Figure 12-10).
fn divisor(dcr: u32) -> u64 {
    match ((dcr >> 1) & 4) | (dcr & 3) {
        7 => 1,
        n => 2 << n,
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Timer {
    /// Initial count register (0: stopped).
    initial: u32,
    /// Divide configuration register.
    dcr: u32,
    /// Timer ticks counted before `start` (carried over a divide change) and the guest time
    /// the current run of ticks started at.
    offset: u64,
    start: Nanos,
    /// IA32_TSC_DEADLINE as written (0: disarmed) and the guest time it stands for.
    tsc_raw: u64,
    tsc_at: Option<Nanos>,
}

/// [`LocalApic::post_mortem`]'s figures; `Display` writes them as `key=value` pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostMortem {
    pub irr: Option<u8>,
    pub isr: Option<u8>,
    pub tpr: u8,
    pub ppr: u8,
    pub svr: u32,
    pub lvt_timer: u32,
    pub initial: u32,
    pub tsc_at: Option<Nanos>,
    pub processed: Nanos,
}

impl core::fmt::Display for PostMortem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let v = |v: Option<u8>| v.map_or(-1, i32::from);
        write!(
            f,
            "irr_top={} isr_top={} tpr={:#x} ppr={:#x} svr={:#x} lvt_timer={:#x} initial={} tsc_deadline_ns={} processed_ns={}",
            v(self.irr),
            v(self.isr),
            self.tpr,
            self.ppr,
            self.svr,
            self.lvt_timer,
            self.initial,
            self.tsc_at.map_or(-1, |t| t.0 as i64),
            self.processed.0
        )
    }
}

/// One vCPU's local APIC.
#[derive(Clone, Debug)]
pub struct LocalApic {
    /// The initial APIC ID (the x2APIC ID).
    initial_id: u32,
    /// The xAPIC ID register's bits 31:24 (writable in xAPIC mode).
    xapic_id: u8,
    bsp: bool,
    /// IA32_APIC_BASE's address bits.
    base: u64,
    enabled: bool,
    x2apic: bool,
    x2apic_supported: bool,
    phys_addr_bits: u8,
    timer_hz: u64,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    irr: Bitmap,
    isr: Bitmap,
    tmr: Bitmap,
    /// Level-triggered vectors EOIed but not yet reported by `eoi_broadcast_vector`.
    eoi_pending: Bitmap,
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer: Timer,
    /// The latest guest time processed by `tick`.
    processed: Nanos,
    /// Sent IPIs not yet taken by the owner (FIFO: `outbox[..outbox_len]`).
    outbox: [Option<Message>; IPI_QUEUE_LEN],
    outbox_len: usize,
    ipis_sent: u64,
    /// EOI register writes (each one an exit: what PV EOI saves).
    eoi_writes: u64,
    ipis_dropped: u64,
    /// Received and not yet taken: an NMI, an INIT, a STARTUP vector, an ExtINT.
    nmi_pending: bool,
    init_pending: bool,
    sipi_vector: Option<u8>,
    extint_pending: bool,
    /// The vCPU waits for a STARTUP IPI (after INIT; APs from power-up).
    wait_for_sipi: bool,
}

impl LocalApic {
    /// A local APIC in its power-up state (SDM §12.4.7.1): base 0xFEE0_0000, globally enabled,
    /// xAPIC mode, software-disabled (SVR 0xFF), all LVT entries masked, DFR all ones,
    /// everything else 0. An AP (`bsp == false`) starts waiting for a STARTUP IPI. `timer_hz` is the frequency the timer counts at before the divider
    /// ([`DEFAULT_TIMER_HZ`]; 0 counts as 1 Hz).
    pub fn new(apic_id: u32, bsp: bool, timer_hz: u64) -> Self {
        let mut apic = Self {
            initial_id: apic_id,
            xapic_id: apic_id as u8,
            bsp,
            base: DEFAULT_APIC_BASE,
            enabled: true,
            x2apic: false,
            x2apic_supported: true,
            phys_addr_bits: DEFAULT_PHYS_ADDR_BITS,
            timer_hz: timer_hz.max(1),
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xFF,
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            eoi_pending: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            timer: Timer::default(),
            processed: Nanos::ZERO,
            outbox: [None; IPI_QUEUE_LEN],
            outbox_len: 0,
            ipis_sent: 0,
            eoi_writes: 0,
            ipis_dropped: 0,
            nmi_pending: false,
            init_pending: false,
            sipi_vector: None,
            extint_pending: false,
            wait_for_sipi: !bsp,
        };
        apic.reset_registers();
        apic
    }

    /// A one-line summary of the interrupt and timer state, for post-mortem reports (a VM
    /// that timed out or halted): the highest requested and in-service vectors, TPR, PPR,
    /// SVR, the timer LVT, the armed TSC deadline's guest time and the time processed.
    pub fn post_mortem(&self) -> PostMortem {
        PostMortem {
            irr: highest(&self.irr),
            isr: highest(&self.isr),
            tpr: self.tpr,
            ppr: self.ppr(),
            svr: self.svr,
            lvt_timer: self.lvt[Lvt::Timer as usize],
            initial: self.timer.initial,
            tsc_at: self.timer.tsc_at,
            processed: self.processed,
        }
    }

    /// Sets MAXPHYADDR (address bits of IA32_APIC_BASE above it are reserved; clamped to
    /// 32..=52).
    pub fn set_phys_addr_bits(&mut self, bits: u8) {
        self.phys_addr_bits = bits.clamp(32, 52);
    }

    /// Whether the guest may enable x2APIC mode (CPUID.1:ECX[21]); when not, setting EXTD is
    /// a reserved-bit #GP.
    pub fn set_x2apic_supported(&mut self, supported: bool) {
        self.x2apic_supported = supported;
    }

    /// The register state after reset or a hardware disable (SDM §12.4.7.1).
    fn reset_registers(&mut self) {
        self.xapic_id = self.initial_id as u8;
        self.init_registers();
    }

    /// The register state after INIT (SDM §12.4.7.3): as after power-up, but the APIC ID
    /// (and IA32_APIC_BASE, which the caller leaves alone) are kept.
    fn init_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = 0xFF;
        self.irr = [0; 8];
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.eoi_pending = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer = Timer::default();
    }

    // ---- IA32_APIC_BASE and modes -------------------------------------------------------

    /// IA32_APIC_BASE: base address, EN, EXTD, BSP.
    pub fn apic_base(&self) -> u64 {
        self.base
            | if self.enabled { APIC_BASE_EN } else { 0 }
            | if self.x2apic { APIC_BASE_EXTD } else { 0 }
            | if self.bsp { APIC_BASE_BSP } else { 0 }
    }

    /// WRMSR IA32_APIC_BASE (SDM §12.4.4, §12.12.5, Figure 12-27). Legal transitions:
    /// disabled <-> xAPIC, xAPIC -> x2APIC, x2APIC -> disabled (and any state to itself, e.g.
    /// to move the base). Illegal ones (disabled -> x2APIC, x2APIC -> xAPIC, EXTD without EN)
    /// and reserved bits (bits 7:0, 9, address bits at or above MAXPHYADDR, EXTD without
    /// x2APIC support) return an error and change nothing. Disabling resets the APIC's
    /// registers; the BSP bit is read-only here.
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), ApicError> {
        let addr_mask = ((1u64 << self.phys_addr_bits) - 1) & !(APIC_PAGE_SIZE - 1);
        let mut allowed = addr_mask | APIC_BASE_EN | APIC_BASE_BSP;
        if self.x2apic_supported {
            allowed |= APIC_BASE_EXTD;
        }
        if value & !allowed != 0 {
            return Err(ApicError::ReservedBits);
        }
        let en = value & APIC_BASE_EN != 0;
        let extd = value & APIC_BASE_EXTD != 0;
        if extd && !en {
            return Err(ApicError::InvalidTransition);
        }
        if (self.x2apic && en && !extd) || (!self.enabled && extd) {
            return Err(ApicError::InvalidTransition);
        }
        if self.enabled && !en {
            self.reset_registers();
        }
        self.base = value & addr_mask;
        self.enabled = en;
        self.x2apic = extd;
        Ok(())
    }

    /// Whether the APIC is in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.x2apic
    }

    /// Whether the APIC is globally enabled (IA32_APIC_BASE.EN).
    pub fn hw_enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the APIC is software-enabled (SVR bit 8) and globally enabled.
    pub fn sw_enabled(&self) -> bool {
        self.enabled && self.svr & SVR_ENABLE != 0
    }

    /// The guest-physical address of the MMIO page: `None` unless enabled in xAPIC mode.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.enabled && !self.x2apic).then_some(self.base)
    }

    /// The APIC ID as the current mode shows it (x2APIC: the 32-bit ID; xAPIC: the 8-bit ID
    /// register field).
    pub fn apic_id(&self) -> u32 {
        if self.x2apic {
            self.initial_id
        } else {
            self.xapic_id as u32
        }
    }

    /// An LVT entry.
    pub fn lvt(&self, which: Lvt) -> u32 {
        self.lvt[which as usize]
    }

    /// Whether the PIC's INTR reaches the vCPU: the APIC is globally disabled (the INTR pin
    /// goes straight to the core) or LINT0 is unmasked with ExtINT delivery (virtual wire
    /// mode, SDM §12.5.1).
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lint0 = self.lvt[Lvt::Lint0 as usize];
        !self.enabled || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == DELIVERY_EXTINT)
    }

    /// Whether this is the bootstrap processor's APIC (IA32_APIC_BASE.BSP).
    pub fn is_bsp(&self) -> bool {
        self.bsp
    }

    /// IPIs queued for [`Self::take_ipi`] so far (self IPIs delivered at once not counted).
    /// EOI register writes so far.
    pub fn eoi_writes(&self) -> u64 {
        self.eoi_writes
    }

    pub fn ipis_sent(&self) -> u64 {
        self.ipis_sent
    }

    /// IPIs not sent (reserved delivery mode, invalid with the self shorthand, queue full)
    /// and messages received but not modelled (SMI; NMI/SMI while waiting for SIPI).
    pub fn ipis_dropped(&self) -> u64 {
        self.ipis_dropped
    }

    fn drop_ipi(&mut self) {
        self.ipis_dropped = self.ipis_dropped.saturating_add(1);
    }

    /// The oldest IPI this APIC sent that the owner has not routed yet.
    pub fn take_ipi(&mut self) -> Option<Message> {
        if self.outbox_len == 0 {
            return None;
        }
        let msg = self.outbox[0].take();
        self.outbox.rotate_left(1);
        self.outbox_len -= 1;
        msg
    }

    /// Whether a received NMI waits for injection (clears it).
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi_pending)
    }

    /// Whether an INIT was received since the last call (clears it): the owner resets the
    /// vCPU (to wait-for-SIPI if [`Self::waiting_for_sipi`], else — the BSP — to
    /// `CpuState::reset()`).
    pub fn take_init(&mut self) -> bool {
        core::mem::take(&mut self.init_pending)
    }

    /// The vector of a STARTUP IPI accepted in wait-for-SIPI (clears it): the owner starts
    /// the vCPU at `CpuState::sipi(vector)`.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.sipi_vector.take()
    }

    /// Whether an ExtINT message arrived (clears it): the owner takes the vector from the
    /// 8259's INTA cycle.
    pub fn take_extint(&mut self) -> bool {
        core::mem::take(&mut self.extint_pending)
    }

    /// Whether the vCPU waits for a STARTUP IPI (it must not run).
    pub fn waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    // ---- interrupt acceptance and priority ----------------------------------------------

    /// A fixed interrupt with `vector` arrives (from the IOAPIC, the PIC through the caller,
    /// an IPI or the LVT): sets its IRR bit, and its TMR bit if `level`-triggered, clears it
    /// if edge-triggered (SDM §12.8.4). Ignored while the APIC is disabled (hardware or
    /// software, SDM §12.4.7.2); vectors 0-15 are illegal (ESR bit 6, dropped).
    pub fn set_irr(&mut self, vector: u8, level: bool) {
        if !self.sw_enabled() {
            return;
        }
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        bit_put(&mut self.irr, vector, true);
        bit_put(&mut self.tmr, vector, level);
    }

    /// A performance-monitoring counter overflowed with its interrupt enabled: the LVT
    /// performance counter entry delivers it as its delivery mode says, fixed (its vector)
    /// or NMI, unless masked (SDM §12.5.1). `mask_on_delivery`: the entry's mask bit is set
    /// as the interrupt is delivered, as Intel processors do (SDM Figure 12-8 note; the
    /// guest's handler unmasks it). Returns whether it was delivered.
    pub fn performance_interrupt(&mut self, mask_on_delivery: bool) -> bool {
        let lvt = self.lvt[Lvt::Perf as usize];
        if lvt & LVT_MASKED != 0 || !self.hw_enabled() {
            return false;
        }
        match (lvt >> 8) & 7 {
            DELIVERY_FIXED => self.set_irr(lvt as u8, false),
            DELIVERY_NMI if !self.wait_for_sipi => self.nmi_pending = true,
            // SMI, INIT, ExtINT and the reserved modes are not allowed in this entry.
            _ => return false,
        }
        if mask_on_delivery {
            self.lvt[Lvt::Perf as usize] |= LVT_MASKED;
        }
        true
    }

    /// Records an error; raises the error LVT interrupt if unmasked (SDM §12.5.3).
    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[Lvt::Error as usize];
        if lvt & LVT_MASKED == 0 && lvt as u8 >= 16 && self.sw_enabled() {
            bit_put(&mut self.irr, lvt as u8, true);
            bit_put(&mut self.tmr, lvt as u8, false);
        }
    }

    /// The processor priority (SDM §12.8.3.1): the TPR if its class is at least the class of
    /// the highest in-service vector, else that class.
    pub fn ppr(&self) -> u8 {
        let isrv = highest(&self.isr).unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// The vector the vCPU would take now: the highest IRR vector whose priority class is
    /// above the PPR's, while the APIC is enabled (hardware and software).
    pub fn pending(&self) -> Option<u8> {
        if !self.sw_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The interrupt acknowledge cycle: moves [`Self::pending`]'s vector from the IRR to the
    /// ISR and returns it.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending()?;
        bit_put(&mut self.irr, v, false);
        bit_put(&mut self.isr, v, true);
        Some(v)
    }

    /// An EOI: retires the highest in-service vector; a level-triggered one is queued for
    /// [`Self::eoi_broadcast_vector`].
    pub fn eoi(&mut self) {
        if let Some(v) = highest(&self.isr) {
            bit_put(&mut self.isr, v, false);
            if bit_get(&self.tmr, v) {
                bit_put(&mut self.eoi_pending, v, true);
            }
        }
    }

    /// Whether the guest may end the one interrupt in service without an EOI write (KVM's
    /// PV EOI): exactly one vector in service, nothing requested, and the vector
    /// edge-triggered (a level-triggered one must reach the I/O APIC through a real EOI).
    /// The one vector is what a deferred EOI will retire.
    pub fn pv_eoi_candidate(&self) -> Option<u8> {
        if self.irr.iter().any(|w| *w != 0) {
            return None;
        }
        let v = highest(&self.isr)?;
        let others = self.isr.iter().enumerate().any(|(i, w)| {
            let mine = if i == (v / 32) as usize { 1u32 << (v % 32) } else { 0 };
            *w & !mine != 0
        });
        (!others && !bit_get(&self.tmr, v)).then_some(v)
    }

    /// A level-triggered vector retired by an EOI since the last call (the caller broadcasts
    /// it to the IOAPIC, which clears the remote IRR of the entries with that vector).
    pub fn eoi_broadcast_vector(&mut self) -> Option<u8> {
        let v = highest(&self.eoi_pending)?;
        bit_put(&mut self.eoi_pending, v, false);
        Some(v)
    }

    /// The x2APIC logical ID derived from the x2APIC ID (SDM §12.12.10.2): cluster in bits
    /// 31:16, one bit of 16 in bits 15:0.
    fn x2apic_ldr(&self) -> u32 {
        ((self.initial_id >> 4) << 16) | (1 << (self.initial_id & 0xF))
    }

    /// Whether a message to `dest` reaches this APIC (SDM §12.6.2; the rules are in the
    /// [`irq`] module documentation). `is_sender`: this APIC sent the message (for the
    /// shorthands). A hardware-disabled APIC matches nothing.
    pub fn matches(&self, dest: Destination, is_sender: bool) -> bool {
        if !self.enabled {
            return false;
        }
        match dest {
            Destination::SelfOnly => is_sender,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf => !is_sender,
            Destination::Physical(id) if self.x2apic => id == irq::X2APIC_BROADCAST || id == self.initial_id,
            Destination::Physical(id) => id == irq::XAPIC_BROADCAST || id == self.xapic_id as u32,
            Destination::Logical(mda) if self.x2apic => {
                let ldr = self.x2apic_ldr();
                mda == irq::X2APIC_BROADCAST || (mda >> 16 == ldr >> 16 && mda & ldr & 0xFFFF != 0)
            }
            Destination::Logical(mda) => {
                let ldr = (self.ldr >> 24) as u8;
                if mda == irq::XAPIC_BROADCAST {
                    true
                } else if mda > 0xFF {
                    false
                } else if self.dfr >> 28 == 0xF {
                    mda as u8 & ldr != 0
                } else {
                    let mda = mda as u8;
                    mda >> 4 == ldr >> 4 && mda & ldr & 0xF != 0
                }
            }
        }
    }

    /// Receives a message addressed to this APIC (the caller checked [`Self::matches`], or
    /// [`irq::route`] chose it). See the module documentation for what each mode does.
    pub fn accept(&mut self, msg: &Message) {
        match msg.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => self.set_irr(msg.vector, msg.trigger_level),
            DeliveryMode::Nmi if !self.wait_for_sipi => self.nmi_pending = true,
            DeliveryMode::Nmi | DeliveryMode::Smi => self.drop_ipi(),
            DeliveryMode::Init => self.init(),
            DeliveryMode::InitDeassert => {}
            DeliveryMode::Startup => {
                if self.wait_for_sipi {
                    self.wait_for_sipi = false;
                    self.sipi_vector = Some(msg.vector);
                }
            }
            DeliveryMode::ExtInt => self.extint_pending = true,
        }
    }

    /// An INIT (SDM §12.4.7.3): the registers go to their INIT state, received events are
    /// forgotten, and an AP waits for SIPI.
    fn init(&mut self) {
        self.init_registers();
        self.nmi_pending = false;
        self.extint_pending = false;
        self.sipi_vector = None;
        self.init_pending = true;
        self.wait_for_sipi = !self.bsp;
    }

    /// Sends the IPI described by ICR low bits `low` to destination field `dest` (SDM
    /// §12.6.1): queued for [`Self::take_ipi`], except Fixed to the self shorthand.
    fn send_ipi(&mut self, low: u32, dest: u32) {
        let vector = low as u8;
        let level_assert = low & ICR_LEVEL_ASSERT != 0;
        let trigger_level = low & ICR_TRIGGER_LEVEL != 0;
        let Some(mode) =
            DeliveryMode::from_icr_bits((low >> ICR_DELIVERY_MODE_SHIFT) as u8, level_assert, trigger_level)
        else {
            self.drop_ipi();
            return;
        };
        if mode.is_fixed() && vector < 16 {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        let dest = match (low >> ICR_SHORTHAND_SHIFT) & 3 {
            SHORTHAND_NONE if low & ICR_LOGICAL != 0 => Destination::Logical(dest),
            SHORTHAND_NONE => Destination::Physical(dest),
            SHORTHAND_SELF => {
                if mode == DeliveryMode::Fixed {
                    self.set_irr(vector, false);
                } else {
                    self.drop_ipi();
                }
                return;
            }
            SHORTHAND_ALL_INCLUDING_SELF => Destination::AllIncludingSelf,
            _ => Destination::AllExcludingSelf,
        };
        // The level and trigger bits only qualify INIT (SDM §12.6.1): every other IPI is an
        // asserting edge.
        let init = matches!(mode, DeliveryMode::Init | DeliveryMode::InitDeassert);
        let msg =
            Message { mode, vector, level_assert: level_assert || !init, trigger_level: trigger_level && init, dest };
        if self.outbox_len == IPI_QUEUE_LEN {
            self.drop_ipi();
            return;
        }
        self.outbox[self.outbox_len] = Some(msg);
        self.outbox_len += 1;
        self.ipis_sent = self.ipis_sent.saturating_add(1);
    }

    // ---- timer ------------------------------------------------------------------------

    fn timer_mode(&self) -> u32 {
        (self.lvt[Lvt::Timer as usize] >> 17) & 3
    }

    fn tsc_deadline_mode(&self) -> bool {
        self.timer_mode() == TIMER_TSC_DEADLINE
    }

    /// Timer ticks counted by `now` (since the last initial-count write).
    fn ticks(&self, now: Nanos) -> u64 {
        let t = &self.timer;
        let n = now.since(t.start) as u128 * self.timer_hz as u128 / (NANOS_PER_SEC as u128 * divisor(t.dcr) as u128);
        u64::try_from(n).unwrap_or(u64::MAX).saturating_add(t.offset)
    }

    /// The earliest guest time at which `ticks` reaches `target`.
    fn time_of_ticks(&self, target: u64) -> Nanos {
        let t = &self.timer;
        let n = target.saturating_sub(t.offset) as u128;
        let ns = (n * divisor(t.dcr) as u128 * NANOS_PER_SEC as u128).div_ceil(self.timer_hz as u128);
        t.start.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// The first expiry of the counting timer (one-shot/periodic) strictly after `after`.
    fn counting_expiry_after(&self, after: Nanos) -> Option<Nanos> {
        let n = self.timer.initial as u64;
        if self.tsc_deadline_mode() || n == 0 {
            return None;
        }
        let c = self.ticks(after);
        if self.timer_mode() == TIMER_PERIODIC {
            Some(self.time_of_ticks((c / n + 1).saturating_mul(n)))
        } else {
            (c < n).then(|| self.time_of_ticks(n))
        }
    }

    /// The current count register (SDM §12.5.4): counts down from the initial count to 0
    /// (one-shot) or reloads (periodic); 0 in TSC-deadline mode.
    fn current_count(&self, now: Nanos) -> u32 {
        let n = self.timer.initial as u64;
        if self.tsc_deadline_mode() || n == 0 {
            return 0;
        }
        let c = self.ticks(now);
        let left = if self.timer_mode() == TIMER_PERIODIC { n - c % n } else { n.saturating_sub(c) };
        left as u32
    }

    fn timer_fire(&mut self) {
        let lvt = self.lvt[Lvt::Timer as usize];
        if lvt & LVT_MASKED == 0 {
            self.set_irr(lvt as u8, false);
        }
    }

    /// Advances the timer to `now`: an expiry in between sets the timer vector in the IRR
    /// (unless masked); a TSC deadline that passed disarms itself.
    pub fn tick(&mut self, now: Nanos) {
        self.advance(now);
    }

    /// [`Self::tick`], returning the time reached (`now`, or the last time seen if later).
    fn advance(&mut self, now: Nanos) -> Nanos {
        let now = now.max(self.processed);
        if self.counting_expiry_after(self.processed).is_some_and(|at| at <= now) {
            self.timer_fire();
        }
        if self.tsc_deadline_mode() && self.timer.tsc_at.is_some_and(|at| at <= now) {
            self.timer.tsc_at = None;
            self.timer.tsc_raw = 0;
            self.timer_fire();
        }
        self.processed = now;
        now
    }

    /// The next guest time the timer expires: the next one-shot/periodic expiry (none while
    /// the timer LVT is masked, whose expiries are lost anyway) or the armed TSC deadline.
    pub fn next_deadline(&self) -> Option<Nanos> {
        let counting = if self.lvt[Lvt::Timer as usize] & LVT_MASKED == 0 {
            self.counting_expiry_after(self.processed)
        } else {
            None
        };
        let tsc = if self.tsc_deadline_mode() { self.timer.tsc_at } else { None };
        earliest(counting, tsc)
    }

    /// RDMSR IA32_TSC_DEADLINE: the value written, or 0 once it fired, was disarmed, or
    /// outside TSC-deadline mode (SDM §12.5.4.1).
    pub fn read_tsc_deadline(&mut self, now: Nanos) -> u64 {
        self.advance(now);
        if self.tsc_deadline_mode() {
            self.timer.tsc_raw
        } else {
            0
        }
    }

    /// WRMSR IA32_TSC_DEADLINE: `tsc` is the value written (0 disarms the timer) and `at` the
    /// guest time it stands for (the caller's TSC conversion). Ignored outside TSC-deadline
    /// mode; a deadline at or before `now` fires at once.
    pub fn write_tsc_deadline(&mut self, tsc: u64, at: Nanos, now: Nanos) {
        let now = self.advance(now);
        if !self.tsc_deadline_mode() || !self.enabled {
            return;
        }
        self.timer.tsc_raw = tsc;
        self.timer.tsc_at = (tsc != 0).then_some(at);
        self.tick(now);
    }

    // ---- register file ------------------------------------------------------------------

    /// Reads the register with index `idx` (offset >> 4) in the current mode.
    fn read_reg(&self, idx: u32, now: Nanos) -> Result<u32, ApicError> {
        let x2 = self.x2apic;
        let i = (idx & 7) as usize;
        Ok(match idx {
            0x02 if x2 => self.initial_id,
            0x02 => (self.xapic_id as u32) << 24,
            0x03 => APIC_VERSION,
            0x08 => self.tpr as u32,
            0x09 | 0x0C if !x2 => 0,
            0x0A => self.ppr() as u32,
            0x0B if x2 => return Err(ApicError::WriteOnly),
            0x0B => 0,
            0x0D if x2 => self.x2apic_ldr(),
            0x0D => self.ldr,
            0x0E if !x2 => self.dfr | 0x0FFF_FFFF,
            0x0F => self.svr,
            0x10..=0x17 => self.isr[i],
            0x18..=0x1F => self.tmr[i],
            0x20..=0x27 => self.irr[i],
            0x28 => self.esr,
            0x30 => self.icr_low & !ICR_DELIVERY_STATUS,
            0x31 if !x2 => self.icr_high,
            0x32..=0x37 => self.lvt[(idx - 0x32) as usize],
            0x38 => self.timer.initial,
            0x39 => self.current_count(now),
            0x3E => self.timer.dcr,
            0x3F if x2 => return Err(ApicError::WriteOnly),
            _ => return Err(ApicError::ReservedRegister),
        })
    }

    /// Writes the register with index `idx` (offset >> 4) in the current mode. In x2APIC mode
    /// reserved bits and read-only registers are errors; in xAPIC mode they are ignored.
    fn write_reg(&mut self, idx: u32, value: u32, now: Nanos) -> Result<(), ApicError> {
        let x2 = self.x2apic;
        let check = |defined: u32| if x2 && value & !defined != 0 { Err(ApicError::ReservedBits) } else { Ok(()) };
        match idx {
            0x02 if !x2 => self.xapic_id = (value >> 24) as u8,
            0x02 | 0x03 | 0x0A | 0x0D | 0x10..=0x27 | 0x39 if x2 => return Err(ApicError::ReadOnly),
            0x03 | 0x0A | 0x10..=0x27 | 0x39 => {}
            0x08 => {
                check(0xFF)?;
                self.tpr = value as u8;
            }
            0x09 | 0x0C if !x2 => {}
            0x0B => {
                check(0)?;
                self.eoi_writes += 1;
                self.eoi();
            }
            0x0D => self.ldr = value & 0xFF00_0000,
            0x0E if !x2 => self.dfr = value | 0x0FFF_FFFF,
            0x0F => {
                check(SVR_WRITABLE)?;
                self.svr = value & SVR_WRITABLE;
                if self.svr & SVR_ENABLE == 0 {
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            0x28 => {
                check(0)?;
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            0x30 if !x2 => {
                self.icr_low = value & ICR_LOW_DEFINED & !ICR_DELIVERY_STATUS;
                self.send_ipi(self.icr_low, self.icr_high >> ICR_HIGH_XAPIC_DEST_SHIFT);
            }
            0x31 if !x2 => self.icr_high = value & 0xFF00_0000,
            0x32..=0x37 => {
                let i = (idx - 0x32) as usize;
                check(LVT_DEFINED[i])?;
                self.write_lvt(i, value, now);
            }
            0x38 => {
                if !self.tsc_deadline_mode() {
                    self.timer.initial = value;
                    self.timer.offset = 0;
                    self.timer.start = now;
                }
            }
            0x3E => {
                check(0xB)?;
                self.timer.offset = self.ticks(now);
                self.timer.start = now;
                self.timer.dcr = value & 0xB;
            }
            0x3F if x2 => {
                check(0xFF)?;
                self.send_ipi(value & 0xFF | SHORTHAND_SELF << ICR_SHORTHAND_SHIFT, 0);
            }
            _ => return Err(ApicError::ReservedRegister),
        }
        Ok(())
    }

    /// Writes LVT entry `i`: entries stay masked while the APIC is software-disabled; a timer
    /// mode change into or out of TSC-deadline mode disarms the timer (SDM §12.5.4.1); one
    /// between one-shot and periodic keeps the current count counting down.
    fn write_lvt(&mut self, i: usize, value: u32, now: Nanos) {
        let mut v = value & LVT_WRITABLE[i];
        if self.svr & SVR_ENABLE == 0 {
            v |= LVT_MASKED;
        }
        if i == Lvt::Timer as usize {
            let was_deadline = self.tsc_deadline_mode();
            if was_deadline != ((v >> 17) & 3 == TIMER_TSC_DEADLINE) {
                self.timer.initial = 0;
                self.timer.tsc_raw = 0;
                self.timer.tsc_at = None;
            } else if !was_deadline && (self.timer_mode() == TIMER_PERIODIC) != ((v >> 17) & 3 == TIMER_PERIODIC) {
                let left = self.current_count(now);
                self.timer.offset = (self.timer.initial - left) as u64;
                self.timer.start = now;
            }
        }
        self.lvt[i] = v;
    }

    /// A 32-bit read at byte `offset` of the xAPIC page. Registers sit in the first 4 bytes
    /// of their 16-byte slot; other bytes, reserved registers and the page outside xAPIC mode
    /// read 0. An unaligned offset within a register's first 4 bytes reads it shifted right.
    pub fn mmio_read(&mut self, offset: u32, now: Nanos) -> u32 {
        let now = self.advance(now);
        let off = offset & 0xFFF;
        if self.mmio_base().is_none() || off & 0xF >= 4 {
            return 0;
        }
        match self.read_reg(off >> 4, now) {
            Ok(v) => v >> (8 * (off & 3)),
            Err(_) => {
                self.error(ESR_ILLEGAL_REGISTER);
                0
            }
        }
    }

    /// A 32-bit write at byte `offset` of the xAPIC page; writes not aligned to a register
    /// and writes outside xAPIC mode are ignored.
    pub fn mmio_write(&mut self, offset: u32, value: u32, now: Nanos) {
        let now = self.advance(now);
        let off = offset & 0xFFF;
        if self.mmio_base().is_none() || off & 0xF != 0 {
            return;
        }
        if self.write_reg(off >> 4, value, now).is_err() {
            self.error(ESR_ILLEGAL_REGISTER);
        }
    }

    /// RDMSR of IA32_APIC_BASE or an x2APIC MSR (SDM §12.12.1.2).
    pub fn msr_read(&mut self, msr: u32, now: Nanos) -> Result<u64, ApicError> {
        match msr {
            MSR_APIC_BASE => Ok(self.apic_base()),
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {
                if !self.x2apic {
                    return Err(ApicError::NotX2apic);
                }
                let now = self.advance(now);
                let idx = msr - X2APIC_MSR_FIRST;
                if idx == 0x30 {
                    return Ok((self.icr_high as u64) << 32 | (self.icr_low & !ICR_DELIVERY_STATUS) as u64);
                }
                self.read_reg(idx, now).map(u64::from)
            }
            _ => Err(ApicError::UnknownMsr),
        }
    }

    /// WRMSR of IA32_APIC_BASE or an x2APIC MSR (SDM §12.12.1.2): the 64-bit ICR at 0x830
    /// sends an IPI; the other registers are 32 bits wide (bits 63:32 reserved).
    pub fn msr_write(&mut self, msr: u32, value: u64, now: Nanos) -> Result<(), ApicError> {
        match msr {
            MSR_APIC_BASE => self.set_apic_base(value),
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {
                if !self.x2apic {
                    return Err(ApicError::NotX2apic);
                }
                let now = self.advance(now);
                let idx = msr - X2APIC_MSR_FIRST;
                if idx == 0x30 {
                    if value as u32 & !ICR_LOW_DEFINED != 0 {
                        return Err(ApicError::ReservedBits);
                    }
                    self.icr_low = value as u32 & !ICR_DELIVERY_STATUS;
                    self.icr_high = (value >> 32) as u32;
                    self.send_ipi(self.icr_low, self.icr_high);
                    return Ok(());
                }
                let value = u32::try_from(value).map_err(|_| ApicError::ReservedBits)?;
                self.write_reg(idx, value, now)
            }
            _ => Err(ApicError::UnknownMsr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: u64 = DEFAULT_APIC_BASE | APIC_BASE_EN;
    const X2: u64 = ON | APIC_BASE_EXTD;

    fn enabled() -> LocalApic {
        let mut a = LocalApic::new(0, true, DEFAULT_TIMER_HZ);
        a.mmio_write(reg::SVR, SVR_ENABLE | 0xFF, Nanos::ZERO);
        a
    }

    fn x2(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id, false, DEFAULT_TIMER_HZ);
        a.set_apic_base(X2).unwrap();
        a.msr_write(reg::msr(reg::SVR), 0x1FF, Nanos::ZERO).unwrap();
        a
    }

    /// Reads a register in either mode.
    fn rd(a: &mut LocalApic, offset: u32, now: Nanos) -> u32 {
        if a.x2apic() {
            a.msr_read(reg::msr(offset), now).unwrap() as u32
        } else {
            a.mmio_read(offset, now)
        }
    }

    fn wr(a: &mut LocalApic, offset: u32, value: u32, now: Nanos) {
        if a.x2apic() {
            a.msr_write(reg::msr(offset), value as u64, now).unwrap()
        } else {
            a.mmio_write(offset, value, now)
        }
    }

    const T0: Nanos = Nanos::ZERO;

    #[test]
    fn reset_values() {
        let mut a = LocalApic::new(3, true, DEFAULT_TIMER_HZ);
        assert_eq!(a.apic_base(), 0xFEE0_0900);
        assert_eq!(LocalApic::new(3, false, 1).apic_base(), 0xFEE0_0800);
        assert_eq!(a.mmio_base(), Some(0xFEE0_0000));
        assert!(!a.x2apic() && a.hw_enabled() && !a.sw_enabled());
        assert_eq!(a.mmio_read(reg::ID, T0), 3 << 24);
        assert_eq!(a.mmio_read(reg::VERSION, T0), 0x0005_0014);
        assert_eq!(a.mmio_read(reg::SVR, T0), 0xFF);
        assert_eq!(a.mmio_read(reg::DFR, T0), 0xFFFF_FFFF);
        for off in [reg::TPR, reg::APR, reg::PPR, reg::LDR, reg::ESR, reg::ICR_LOW, reg::ICR_HIGH] {
            assert_eq!(a.mmio_read(off, T0), 0, "{off:#x}");
        }
        for off in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16) {
            assert_eq!(a.mmio_read(off, T0), LVT_MASKED, "{off:#x}");
        }
        for off in [reg::TIMER_INITIAL, reg::TIMER_CURRENT, reg::TIMER_DIVIDE] {
            assert_eq!(a.mmio_read(off, T0), 0);
        }
        for i in 0..24 {
            assert_eq!(a.mmio_read(reg::ISR + 16 * i, T0), 0);
        }
        assert_eq!(a.pending(), None);
        assert_eq!(a.next_deadline(), None);
        assert!(!a.accepts_pic_interrupts(), "LINT0 masked at reset");
        // Interrupts are not accepted while software-disabled.
        a.set_irr(0x40, false);
        a.mmio_write(reg::SVR, 0x1FF, T0);
        assert_eq!(a.pending(), None);
    }

    #[test]
    fn xapic_and_x2apic_registers_agree() {
        let mut results = Vec::new();
        for mut a in [enabled(), x2(0)] {
            let now = Nanos(5);
            wr(&mut a, reg::TPR, 0x35, now);
            wr(&mut a, reg::SVR, 0x3EF, now);
            wr(&mut a, reg::LVT_LINT0, 0x700, now);
            wr(&mut a, reg::LVT_ERROR, 0xFE, now);
            wr(&mut a, reg::LVT_TIMER, 0x2_00EC, now);
            wr(&mut a, reg::TIMER_DIVIDE, 0xB, now);
            wr(&mut a, reg::TIMER_INITIAL, 1000, now);
            let regs: Vec<u32> = [
                reg::TPR,
                reg::PPR,
                reg::SVR,
                reg::LVT_TIMER,
                reg::LVT_LINT0,
                reg::LVT_ERROR,
                reg::LVT_THERMAL,
                reg::TIMER_INITIAL,
                reg::TIMER_DIVIDE,
                reg::VERSION,
            ]
            .iter()
            .map(|&o| rd(&mut a, o, Nanos(305)))
            .collect();
            assert_eq!(rd(&mut a, reg::TIMER_CURRENT, Nanos(305)), 700);
            assert!(a.accepts_pic_interrupts());
            results.push(regs);
        }
        assert_eq!(results[0], [0x35, 0x35, 0x3EF, 0x2_00EC, 0x700, 0xFE, LVT_MASKED, 1000, 0xB, 0x5_0014]);
        assert_eq!(results[0], results[1]);
        // The x2APIC ID and LDR.
        let mut a = x2(0x1_2345);
        assert_eq!(a.msr_read(reg::msr(reg::ID), T0), Ok(0x1_2345));
        assert_eq!(a.msr_read(reg::msr(reg::LDR), T0), Ok(0x1234 << 16 | 1 << 5));
        assert_eq!(a.apic_id(), 0x1_2345);
        assert_eq!(a.msr_read(0x830, T0), Ok(0));
    }

    #[test]
    fn mode_transitions() {
        let mut a = LocalApic::new(1, false, DEFAULT_TIMER_HZ);
        assert_eq!(a.set_apic_base(DEFAULT_APIC_BASE | APIC_BASE_EXTD), Err(ApicError::InvalidTransition));
        assert_eq!(a.set_apic_base(ON | 1), Err(ApicError::ReservedBits));
        assert_eq!(a.set_apic_base(ON | 1 << 9), Err(ApicError::ReservedBits));
        assert_eq!(a.set_apic_base(ON | 1 << 52), Err(ApicError::ReservedBits));
        // Move the page, then disable: the registers reset.
        a.mmio_write(reg::TPR, 0x20, T0);
        a.set_apic_base(0xFEC0_0000 | APIC_BASE_EN).unwrap();
        assert_eq!(a.mmio_base(), Some(0xFEC0_0000));
        assert_eq!(a.mmio_read(reg::TPR, T0), 0x20);
        a.set_apic_base(DEFAULT_APIC_BASE).unwrap();
        assert_eq!(a.mmio_base(), None);
        assert_eq!(a.apic_base(), DEFAULT_APIC_BASE);
        assert!(a.accepts_pic_interrupts(), "a disabled APIC passes INTR through");
        assert_eq!(a.set_apic_base(X2), Err(ApicError::InvalidTransition), "disabled -> x2APIC");
        a.set_apic_base(ON).unwrap();
        assert_eq!(a.mmio_read(reg::TPR, T0), 0);
        // xAPIC -> x2APIC keeps state; x2APIC -> xAPIC is illegal; via disabled is fine.
        a.mmio_write(reg::TPR, 0x20, T0);
        assert_eq!(a.msr_read(reg::msr(reg::TPR), T0), Err(ApicError::NotX2apic));
        assert_eq!(a.msr_write(reg::msr(reg::EOI), 0, T0), Err(ApicError::NotX2apic));
        a.set_apic_base(X2).unwrap();
        assert_eq!(a.mmio_base(), None);
        assert_eq!(a.mmio_read(reg::TPR, T0), 0, "no MMIO page in x2APIC mode");
        assert_eq!(a.msr_read(reg::msr(reg::TPR), T0), Ok(0x20));
        assert_eq!(a.msr_read(MSR_APIC_BASE, T0), Ok(X2));
        assert_eq!(a.set_apic_base(ON), Err(ApicError::InvalidTransition));
        assert_eq!(a.msr_write(MSR_APIC_BASE, ON, T0), Err(ApicError::InvalidTransition));
        assert!(a.x2apic());
        a.set_apic_base(DEFAULT_APIC_BASE).unwrap();
        a.set_apic_base(ON).unwrap();
        assert_eq!(a.mmio_read(reg::TPR, T0), 0);
        let mut b = LocalApic::new(0, false, 1);
        b.set_x2apic_supported(false);
        assert_eq!(b.set_apic_base(X2), Err(ApicError::ReservedBits));
        b.set_phys_addr_bits(36);
        assert_eq!(b.set_apic_base(ON | 1 << 36), Err(ApicError::ReservedBits));
        assert_eq!(b.msr_read(0x10, T0), Err(ApicError::UnknownMsr));
        assert!(!ApicError::UnknownMsr.is_gp() && ApicError::ReadOnly.is_gp());
    }

    #[test]
    fn x2apic_gp_cases() {
        let mut a = x2(7);
        let m = reg::msr;
        assert_eq!(a.msr_write(m(reg::ID), 7, T0), Err(ApicError::ReadOnly));
        assert_eq!(a.msr_write(m(reg::VERSION), 0, T0), Err(ApicError::ReadOnly));
        assert_eq!(a.msr_write(m(reg::LDR), 0, T0), Err(ApicError::ReadOnly));
        assert_eq!(a.msr_write(m(reg::PPR), 0, T0), Err(ApicError::ReadOnly));
        assert_eq!(a.msr_write(m(reg::IRR), 0, T0), Err(ApicError::ReadOnly));
        assert_eq!(a.msr_write(m(reg::TIMER_CURRENT), 0, T0), Err(ApicError::ReadOnly));
        assert_eq!(a.msr_read(m(reg::EOI), T0), Err(ApicError::WriteOnly));
        assert_eq!(a.msr_read(m(reg::SELF_IPI), T0), Err(ApicError::WriteOnly));
        for off in [reg::DFR, reg::APR, reg::ICR_HIGH, reg::RRD, reg::CMCI, 0x400, 0xFF0] {
            assert_eq!(a.msr_read(m(off), T0), Err(ApicError::ReservedRegister), "{off:#x}");
            assert_eq!(a.msr_write(m(off), 0, T0), Err(ApicError::ReservedRegister), "{off:#x}");
        }
        assert_eq!(a.msr_write(m(reg::EOI), 1, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(m(reg::ESR), 1, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(m(reg::TPR), 0x100, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(m(reg::TPR), 1 << 32, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(m(reg::SVR), 1 << 12, T0), Err(ApicError::ReservedBits), "no EOI suppression");
        assert_eq!(a.msr_write(m(reg::LVT_TIMER), 1 << 19, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(m(reg::TIMER_DIVIDE), 4, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(m(reg::SELF_IPI), 0x100, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_write(0x830, 1 << 13, T0), Err(ApicError::ReservedBits));
        assert_eq!(a.msr_read(m(reg::TPR), T0), Ok(0), "failed writes change nothing");
        // xAPIC mode ignores such writes instead.
        let mut b = enabled();
        b.mmio_write(reg::VERSION, 0, T0);
        b.mmio_write(reg::TPR, 0x1FF, T0);
        assert_eq!(b.mmio_read(reg::VERSION, T0), APIC_VERSION);
        assert_eq!(b.mmio_read(reg::TPR, T0), 0xFF);
        b.mmio_write(reg::ID, 0x0900_0000, T0);
        assert_eq!(b.mmio_read(reg::ID, T0), 0x0900_0000, "the xAPIC ID is writable");
        b.mmio_write(reg::LDR, 0xFFFF_FFFF, T0);
        b.mmio_write(reg::DFR, 0x0000_0000, T0);
        assert_eq!(b.mmio_read(reg::LDR, T0), 0xFF00_0000);
        assert_eq!(b.mmio_read(reg::DFR, T0), 0x0FFF_FFFF);
    }

    #[test]
    fn priority_tpr_and_nesting() {
        let mut a = enabled();
        for v in [0x31, 0x52, 0x45] {
            a.set_irr(v, false);
        }
        assert_eq!(a.pending(), Some(0x52));
        a.mmio_write(reg::TPR, 0x60, T0);
        assert_eq!(a.pending(), None);
        a.mmio_write(reg::TPR, 0x5F, T0);
        assert_eq!(a.pending(), None, "class 5 is not above PPR class 5");
        a.mmio_write(reg::TPR, 0x40, T0);
        assert_eq!(a.mmio_read(reg::PPR, T0), 0x40);
        assert_eq!(a.acknowledge(), Some(0x52));
        assert_eq!(a.mmio_read(reg::PPR, T0), 0x50);
        assert_eq!(a.mmio_read(reg::ISR + 0x20, T0), 1 << 0x12);
        assert_eq!(a.mmio_read(reg::IRR + 0x10, T0), 1 << 0x11);
        assert_eq!(a.mmio_read(reg::IRR + 0x20, T0), 1 << 0x05);
        assert_eq!(a.pending(), None, "0x45 waits behind in-service 0x52");
        a.set_irr(0x61, false);
        assert_eq!(a.acknowledge(), Some(0x61), "a higher class nests");
        assert_eq!(a.mmio_read(reg::PPR, T0), 0x60);
        a.mmio_write(reg::EOI, 0, T0);
        assert_eq!(a.mmio_read(reg::PPR, T0), 0x50);
        assert_eq!(a.pending(), None);
        a.mmio_write(reg::EOI, 0, T0);
        assert_eq!(a.pending(), None, "TPR 0x40 still blocks class 4");
        a.mmio_write(reg::TPR, 0, T0);
        assert_eq!(a.acknowledge(), Some(0x45));
        a.eoi();
        assert_eq!(a.acknowledge(), Some(0x31));
        a.eoi();
        assert_eq!(a.acknowledge(), None);
        a.eoi(); // nothing in service: harmless
        assert_eq!(a.eoi_broadcast_vector(), None, "edge-triggered: no broadcast");
        // Level-triggered: TMR set on acceptance, EOI broadcast once.
        a.set_irr(0x70, true);
        assert_eq!(a.mmio_read(reg::TMR + 0x30, T0), 1 << 0x10);
        assert_eq!(a.acknowledge(), Some(0x70));
        a.mmio_write(reg::EOI, 0, T0);
        assert_eq!(a.eoi_broadcast_vector(), Some(0x70));
        assert_eq!(a.eoi_broadcast_vector(), None);
        // Illegal vectors are refused and reported in the ESR after a write.
        a.set_irr(7, false);
        assert_eq!(a.pending(), None);
        assert_eq!(a.mmio_read(reg::ESR, T0), 0);
        a.mmio_write(reg::ESR, 0, T0);
        assert_eq!(a.mmio_read(reg::ESR, T0), ESR_RECEIVE_ILLEGAL_VECTOR);
        a.mmio_write(reg::ESR, 0, T0);
        assert_eq!(a.mmio_read(reg::ESR, T0), 0);
    }

    #[test]
    fn x2apic_priority_and_eoi() {
        let mut a = x2(1);
        a.set_irr(0x80, false);
        a.set_irr(0x90, true);
        a.msr_write(reg::msr(reg::TPR), 0x85, T0).unwrap();
        assert_eq!(a.acknowledge(), Some(0x90));
        assert_eq!(a.msr_read(reg::msr(reg::PPR), T0), Ok(0x90));
        a.msr_write(reg::msr(reg::EOI), 0, T0).unwrap();
        assert_eq!(a.eoi_broadcast_vector(), Some(0x90));
        assert_eq!(a.pending(), None);
        assert_eq!(a.msr_read(reg::msr(reg::IRR + 0x40), T0), Ok(1));
    }

    #[test]
    fn one_shot_timer_with_divide() {
        let mut a = enabled();
        a.mmio_write(reg::LVT_TIMER, 0xEC, T0);
        a.mmio_write(reg::TIMER_DIVIDE, 0, Nanos(100)); // divide by 2: 2 ns per tick at 1 GHz
        a.mmio_write(reg::TIMER_INITIAL, 1000, Nanos(100));
        assert_eq!(a.next_deadline(), Some(Nanos(2100)));
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, Nanos(100)), 1000);
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, Nanos(1100)), 500);
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, Nanos(2099)), 1);
        a.tick(Nanos(2099));
        assert_eq!(a.pending(), None);
        a.tick(Nanos(2100));
        assert_eq!(a.pending(), Some(0xEC));
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, Nanos(2100)), 0);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(a.acknowledge(), Some(0xEC));
        a.eoi();
        a.tick(Nanos(1_000_000));
        assert_eq!(a.pending(), None, "one-shot fires once");
        // All divide values, at 100 MHz (10 ns per input clock).
        for (dcr, div) in [(0, 2), (1, 4), (2, 8), (3, 16), (8, 32), (9, 64), (0xA, 128), (0xB, 1)] {
            let mut b = LocalApic::new(0, false, 100_000_000);
            b.mmio_write(reg::SVR, 0x1FF, T0);
            b.mmio_write(reg::LVT_TIMER, 0x40, T0);
            b.mmio_write(reg::TIMER_DIVIDE, dcr, T0);
            b.mmio_write(reg::TIMER_INITIAL, 100, Nanos(7));
            assert_eq!(b.next_deadline(), Some(Nanos(7 + 100 * 10 * div)), "divide {div}");
            assert_eq!(b.mmio_read(reg::TIMER_CURRENT, Nanos(7 + 30 * 10 * div - 1)), 71);
            assert_eq!(b.mmio_read(reg::TIMER_CURRENT, Nanos(7 + 30 * 10 * div)), 70);
        }
        // A divide change mid-count keeps the count and changes the rate.
        let mut c = enabled();
        c.mmio_write(reg::LVT_TIMER, 0x41, T0);
        c.mmio_write(reg::TIMER_DIVIDE, 0xB, T0);
        c.mmio_write(reg::TIMER_INITIAL, 1000, T0);
        c.mmio_write(reg::TIMER_DIVIDE, 0x3, Nanos(400)); // 600 left, now 16 ns per tick
        assert_eq!(c.mmio_read(reg::TIMER_CURRENT, Nanos(400 + 160)), 590);
        assert_eq!(c.next_deadline(), Some(Nanos(400 + 600 * 16)));
        // Writing 0 stops the timer.
        c.mmio_write(reg::TIMER_INITIAL, 0, Nanos(500));
        assert_eq!(c.next_deadline(), None);
        assert_eq!(c.mmio_read(reg::TIMER_CURRENT, Nanos(600)), 0);
    }

    #[test]
    fn periodic_timer() {
        let mut a = x2(0);
        let m = reg::msr;
        a.msr_write(m(reg::LVT_TIMER), 1 << 17 | 0xEF, T0).unwrap();
        a.msr_write(m(reg::TIMER_DIVIDE), 0xB, T0).unwrap();
        a.msr_write(m(reg::TIMER_INITIAL), 1000, Nanos(50)).unwrap();
        assert_eq!(a.next_deadline(), Some(Nanos(1050)));
        a.tick(Nanos(1050));
        assert_eq!(a.acknowledge(), Some(0xEF));
        a.eoi();
        assert_eq!(a.next_deadline(), Some(Nanos(2050)));
        assert_eq!(a.msr_read(m(reg::TIMER_CURRENT), Nanos(1050)), Ok(1000), "reloaded");
        assert_eq!(a.msr_read(m(reg::TIMER_CURRENT), Nanos(1300)), Ok(750));
        // Missed periods coalesce into one interrupt; the phase is kept.
        a.tick(Nanos(5500));
        assert_eq!(a.acknowledge(), Some(0xEF));
        a.eoi();
        assert_eq!(a.pending(), None);
        assert_eq!(a.next_deadline(), Some(Nanos(6050)));
        assert_eq!(a.msr_read(m(reg::TIMER_CURRENT), Nanos(5500)), Ok(550));
        // Switching to one-shot keeps counting, ends at the next expiry.
        a.msr_write(m(reg::LVT_TIMER), 0xEF, Nanos(5600)).unwrap();
        assert_eq!(a.msr_read(m(reg::TIMER_CURRENT), Nanos(5600)), Ok(450));
        assert_eq!(a.next_deadline(), Some(Nanos(6050)));
        a.tick(Nanos(6050));
        assert_eq!(a.acknowledge(), Some(0xEF));
        assert_eq!(a.next_deadline(), None);
        assert_eq!(a.msr_read(m(reg::TIMER_CURRENT), Nanos(6100)), Ok(0));
        // And back to periodic: stopped at 0, it stays stopped until the next initial count.
        a.msr_write(m(reg::LVT_TIMER), 1 << 17 | 0xEF, Nanos(6200)).unwrap();
        a.msr_write(m(reg::TIMER_INITIAL), 100, Nanos(6200)).unwrap();
        assert_eq!(a.next_deadline(), Some(Nanos(6300)));
    }

    #[test]
    fn masked_timer_loses_expiries() {
        let mut a = enabled();
        a.mmio_write(reg::LVT_TIMER, LVT_MASKED | 1 << 17 | 0x50, T0);
        a.mmio_write(reg::TIMER_DIVIDE, 0xB, T0);
        a.mmio_write(reg::TIMER_INITIAL, 100, T0);
        assert_eq!(a.next_deadline(), None, "no wake-ups while masked");
        a.tick(Nanos(250));
        assert_eq!(a.pending(), None);
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, Nanos(250)), 50, "still counts");
        a.mmio_write(reg::LVT_TIMER, 1 << 17 | 0x50, Nanos(260));
        assert_eq!(a.pending(), None, "an expiry while masked is lost");
        assert_eq!(a.next_deadline(), Some(Nanos(300)));
        a.tick(Nanos(300));
        assert_eq!(a.pending(), Some(0x50));
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut a = enabled();
        a.mmio_write(reg::TIMER_INITIAL, 500, T0);
        a.write_tsc_deadline(1234, Nanos(100), T0);
        assert_eq!(a.read_tsc_deadline(T0), 0, "ignored outside TSC-deadline mode");
        a.mmio_write(reg::LVT_TIMER, 2 << 17 | 0xE0, Nanos(10));
        assert_eq!(a.mmio_read(reg::TIMER_INITIAL, Nanos(10)), 0, "the mode change disarmed the count");
        assert_eq!(a.next_deadline(), None);
        a.mmio_write(reg::TIMER_INITIAL, 500, Nanos(10));
        assert_eq!(a.mmio_read(reg::TIMER_INITIAL, Nanos(10)), 0, "ignored in TSC-deadline mode");
        a.write_tsc_deadline(0xABCD, Nanos(1000), Nanos(20));
        assert_eq!(a.read_tsc_deadline(Nanos(30)), 0xABCD);
        assert_eq!(a.next_deadline(), Some(Nanos(1000)));
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, Nanos(40)), 0);
        a.tick(Nanos(999));
        assert_eq!(a.pending(), None);
        a.tick(Nanos(1001));
        assert_eq!(a.acknowledge(), Some(0xE0));
        a.eoi();
        assert_eq!(a.read_tsc_deadline(Nanos(1001)), 0, "disarmed after firing");
        assert_eq!(a.next_deadline(), None);
        // Writing 0 disarms.
        a.write_tsc_deadline(0x1_0000, Nanos(2000), Nanos(1100));
        a.write_tsc_deadline(0, T0, Nanos(1200));
        assert_eq!(a.next_deadline(), None);
        a.tick(Nanos(3000));
        assert_eq!(a.pending(), None);
        // A deadline in the past fires at once.
        a.write_tsc_deadline(5, Nanos(5), Nanos(3000));
        assert_eq!(a.pending(), Some(0xE0));
        // Leaving TSC-deadline mode disarms the deadline.
        a.write_tsc_deadline(0x2_0000, Nanos(9000), Nanos(3000));
        a.mmio_write(reg::LVT_TIMER, 0xE0, Nanos(3100));
        a.mmio_write(reg::LVT_TIMER, 2 << 17 | 0xE0, Nanos(3200));
        assert_eq!(a.next_deadline(), None);
    }

    fn msg(mode: DeliveryMode, vector: u8, dest: Destination) -> Message {
        Message { mode, vector, level_assert: true, trigger_level: false, dest }
    }

    #[test]
    fn sending_ipis() {
        let mut a = enabled();
        a.mmio_write(reg::ID, 0x0200_0000, T0);
        // Shorthand self, Fixed: straight into the own IRR, no message.
        a.mmio_write(reg::ICR_LOW, 1 << 18 | 0x41, T0);
        assert_eq!(a.mmio_read(reg::ICR_LOW, T0), 1 << 18 | 0x41, "delivery status idle");
        assert_eq!(a.acknowledge(), Some(0x41));
        a.eoi();
        assert_eq!(a.take_ipi(), None);
        // Physical destination from ICR high bits 31:24; the low write sends.
        a.mmio_write(reg::ICR_HIGH, 0x0300_0000, T0);
        assert_eq!(a.take_ipi(), None, "the high half alone sends nothing");
        a.mmio_write(reg::ICR_LOW, 0x43, T0);
        assert_eq!(a.take_ipi(), Some(msg(DeliveryMode::Fixed, 0x43, Destination::Physical(3))));
        assert_eq!(a.pending(), None, "not to itself");
        // Shorthands, logical, broadcast.
        a.mmio_write(reg::ICR_LOW, 3 << 18 | 0x44, T0);
        a.mmio_write(reg::ICR_LOW, 2 << 18 | 0x45, T0);
        a.mmio_write(reg::ICR_HIGH, 0x0600_0000, T0);
        a.mmio_write(reg::ICR_LOW, ICR_LOGICAL | 1 << 8 | 0x47, T0);
        a.mmio_write(reg::ICR_HIGH, 0xFF00_0000, T0);
        a.mmio_write(reg::ICR_LOW, 4 << 8, T0);
        assert_eq!(a.take_ipi(), Some(msg(DeliveryMode::Fixed, 0x44, Destination::AllExcludingSelf)));
        assert_eq!(a.take_ipi(), Some(msg(DeliveryMode::Fixed, 0x45, Destination::AllIncludingSelf)));
        assert_eq!(a.take_ipi(), Some(msg(DeliveryMode::LowestPriority, 0x47, Destination::Logical(6))));
        assert_eq!(a.take_ipi(), Some(msg(DeliveryMode::Nmi, 0, Destination::Physical(0xFF))));
        assert_eq!(a.take_ipi(), None);
        assert_eq!(a.ipis_sent(), 5);
        // Linux's AP start: INIT assert (level), INIT de-assert, STARTUP twice.
        a.mmio_write(reg::ICR_HIGH, 0x0100_0000, T0);
        for low in [0xC500, 0x8500, 0x0609, 0x0609] {
            a.mmio_write(reg::ICR_LOW, low, T0);
        }
        let init = Message { trigger_level: true, ..msg(DeliveryMode::Init, 0, Destination::Physical(1)) };
        assert_eq!(a.take_ipi(), Some(init));
        let deassert = Message { level_assert: false, ..init };
        assert_eq!(a.take_ipi(), Some(Message { mode: DeliveryMode::InitDeassert, ..deassert }));
        let sipi = msg(DeliveryMode::Startup, 9, Destination::Physical(1));
        assert_eq!(a.take_ipi(), Some(sipi));
        assert_eq!(a.take_ipi(), Some(sipi));
        // Fixed IPIs are asserting edges whatever the level and trigger bits say.
        a.mmio_write(reg::ICR_LOW, 0xC000 | 0x50, T0);
        assert_eq!(a.take_ipi().map(|m| m.trigger_level), Some(false));
        // Dropped: reserved modes, non-Fixed with the self shorthand, a full queue; an
        // illegal vector sets ESR bit 5.
        a.mmio_write(reg::ICR_LOW, 3 << 8 | 0x40, T0);
        a.mmio_write(reg::ICR_LOW, 7 << 8 | 0x40, T0);
        a.mmio_write(reg::ICR_LOW, 1 << 18 | 4 << 8, T0);
        assert_eq!(a.ipis_dropped(), 3);
        a.mmio_write(reg::ICR_LOW, 0x05, T0);
        a.mmio_write(reg::ESR, 0, T0);
        assert_eq!(a.mmio_read(reg::ESR, T0), ESR_SEND_ILLEGAL_VECTOR);
        assert_eq!(a.take_ipi(), None);
        for v in 0..IPI_QUEUE_LEN as u32 + 2 {
            a.mmio_write(reg::ICR_LOW, 0x60 + v, T0);
        }
        assert_eq!(a.ipis_dropped(), 5);
        for v in 0..IPI_QUEUE_LEN as u8 {
            assert_eq!(a.take_ipi().map(|m| m.vector), Some(0x60 + v), "FIFO order");
        }
        assert_eq!(a.take_ipi(), None);
        assert_eq!(a.pending(), None);

        // x2APIC: one 64-bit ICR write with a 32-bit destination; SELF IPI MSR is local.
        let mut b = x2(0x300);
        b.msr_write(0x830, 0x301 << 32 | 0x51, T0).unwrap();
        assert_eq!(b.msr_read(0x830, T0), Ok(0x301 << 32 | 0x51));
        assert_eq!(b.take_ipi(), Some(msg(DeliveryMode::Fixed, 0x51, Destination::Physical(0x301))));
        b.msr_write(reg::msr(reg::SELF_IPI), 0x53, T0).unwrap();
        assert_eq!(b.acknowledge(), Some(0x53));
        assert_eq!(b.take_ipi(), None);
        assert_eq!(b.msr_read(0x830, T0), Ok(0x301 << 32 | 0x51), "SELF IPI leaves the ICR alone");
        b.eoi();
        b.msr_write(0x830, (0x30 << 16 | 1) << 32 | ICR_LOGICAL as u64 | 0x54, T0).unwrap();
        assert_eq!(b.take_ipi(), Some(msg(DeliveryMode::Fixed, 0x54, Destination::Logical(0x30 << 16 | 1))));
        b.msr_write(0x830, u64::MAX << 32 | 0x0500, T0).unwrap();
        let init = b.take_ipi().unwrap();
        assert_eq!((init.mode, init.dest), (DeliveryMode::Init, Destination::Physical(u32::MAX)));
        // A sent IPI that addresses the sender reaches it through the owner.
        let m = msg(DeliveryMode::Fixed, 0x55, Destination::Physical(0x300));
        assert!(b.matches(m.dest, true));
        b.accept(&m);
        assert_eq!(b.acknowledge(), Some(0x55));
    }

    #[test]
    fn performance_counter_interrupt() {
        let mut a = enabled();
        assert!(!a.performance_interrupt(true), "masked at reset");
        // NMI delivery, as Linux programs it; Intel masks the entry as it delivers.
        a.mmio_write(reg::LVT_PERF, DELIVERY_NMI << 8, T0);
        assert!(a.performance_interrupt(true));
        assert!(a.take_nmi());
        assert_eq!(a.lvt(Lvt::Perf), LVT_MASKED | DELIVERY_NMI << 8);
        assert!(!a.performance_interrupt(true), "masked until the handler unmasks it");
        // AMD leaves it unmasked; fixed delivery sets the vector's IRR bit.
        a.mmio_write(reg::LVT_PERF, 0x55, T0);
        assert!(a.performance_interrupt(false));
        assert!(a.performance_interrupt(false));
        assert_eq!(a.lvt(Lvt::Perf), 0x55);
        assert_eq!(a.pending(), Some(0x55));
        assert!(!a.take_nmi());
        // SMI/INIT/ExtINT are not delivery modes of this entry.
        a.mmio_write(reg::LVT_PERF, 7 << 8, T0);
        assert!(!a.performance_interrupt(false));
    }

    #[test]
    fn receiving_nmi_init_sipi() {
        let t = Nanos(100);
        let mut ap = LocalApic::new(1, false, DEFAULT_TIMER_HZ);
        assert!(ap.waiting_for_sipi(), "an AP starts waiting for SIPI");
        assert!(!LocalApic::new(0, true, 1).waiting_for_sipi(), "the BSP runs");
        // STARTUP leaves wait-for-SIPI once; a second one is ignored.
        ap.accept(&msg(DeliveryMode::Startup, 0x9A, Destination::Physical(1)));
        assert!(!ap.waiting_for_sipi());
        ap.accept(&msg(DeliveryMode::Startup, 0x10, Destination::Physical(1)));
        assert_eq!(ap.take_sipi(), Some(0x9A));
        assert_eq!(ap.take_sipi(), None);
        // The AP's OS sets the APIC up.
        ap.mmio_write(reg::ID, 0x0700_0000, t);
        ap.mmio_write(reg::SVR, 0x1FF, t);
        ap.mmio_write(reg::TPR, 0x20, t);
        ap.mmio_write(reg::LDR, 0x0200_0000, t);
        ap.mmio_write(reg::DFR, 0x0FFF_FFFF, t);
        ap.mmio_write(reg::LVT_TIMER, 1 << 17 | 0xEC, t);
        ap.mmio_write(reg::TIMER_INITIAL, 1000, t);
        ap.accept(&Message { trigger_level: true, ..msg(DeliveryMode::Fixed, 0x70, Destination::Physical(7)) });
        assert_eq!(ap.acknowledge(), Some(0x70));
        ap.accept(&msg(DeliveryMode::Fixed, 0x71, Destination::Physical(7)));
        // NMI, SMI, INIT de-assert, ExtINT.
        ap.accept(&msg(DeliveryMode::Nmi, 0, Destination::AllExcludingSelf));
        assert!(ap.take_nmi());
        assert!(!ap.take_nmi());
        ap.accept(&msg(DeliveryMode::Smi, 0, Destination::AllExcludingSelf));
        assert_eq!(ap.ipis_dropped(), 1);
        ap.accept(&msg(DeliveryMode::InitDeassert, 0, Destination::AllIncludingSelf));
        assert!(!ap.take_init());
        ap.accept(&msg(DeliveryMode::ExtInt, 0, Destination::Physical(7)));
        assert!(ap.take_extint());
        assert!(!ap.take_extint());
        // INIT: registers to their INIT state, the APIC ID and base kept, wait for SIPI.
        ap.accept(&msg(DeliveryMode::Nmi, 0, Destination::AllExcludingSelf));
        ap.accept(&msg(DeliveryMode::Init, 0, Destination::Physical(7)));
        assert!(ap.take_init());
        assert!(!ap.take_init());
        assert!(!ap.take_nmi(), "INIT discards a pending NMI");
        assert!(ap.waiting_for_sipi());
        assert_eq!(ap.mmio_read(reg::ID, t), 0x0700_0000, "the APIC ID survives INIT");
        assert_eq!(ap.apic_base(), DEFAULT_APIC_BASE | APIC_BASE_EN);
        assert_eq!(ap.mmio_read(reg::SVR, t), 0xFF);
        assert_eq!(ap.mmio_read(reg::DFR, t), 0xFFFF_FFFF);
        for off in [reg::TPR, reg::LDR, reg::TIMER_INITIAL, reg::TMR + 0x30, reg::ISR + 0x30, reg::IRR + 0x30] {
            assert_eq!(ap.mmio_read(off, t), 0, "{off:#x}");
        }
        assert_eq!(ap.mmio_read(reg::LVT_TIMER, t), LVT_MASKED);
        assert_eq!(ap.pending(), None);
        assert_eq!(ap.next_deadline(), None);
        // In wait-for-SIPI NMIs are blocked; fixed vectors are refused (software-disabled).
        ap.accept(&msg(DeliveryMode::Nmi, 0, Destination::Physical(7)));
        assert!(!ap.take_nmi());
        ap.accept(&msg(DeliveryMode::Fixed, 0x80, Destination::Physical(7)));
        assert_eq!(ap.mmio_read(reg::IRR + 0x40, t), 0);
        ap.accept(&msg(DeliveryMode::Startup, 0x9B, Destination::Physical(7)));
        assert_eq!(ap.take_sipi(), Some(0x9B));
        // x2APIC mode survives INIT; the BSP does not wait for SIPI after INIT.
        let mut bsp = LocalApic::new(0, true, DEFAULT_TIMER_HZ);
        bsp.set_apic_base(X2).unwrap();
        bsp.msr_write(reg::msr(reg::TPR), 0x30, t).unwrap();
        bsp.accept(&msg(DeliveryMode::Init, 0, Destination::AllIncludingSelf));
        assert!(bsp.take_init());
        assert!(bsp.x2apic() && !bsp.waiting_for_sipi());
        assert_eq!(bsp.msr_read(reg::msr(reg::TPR), t), Ok(0));
        bsp.accept(&msg(DeliveryMode::Startup, 0x10, Destination::AllIncludingSelf));
        assert_eq!(bsp.take_sipi(), None);
    }

    #[test]
    fn software_disable_masks_lvts() {
        let mut a = enabled();
        a.mmio_write(reg::LVT_TIMER, 1 << 17 | 0x30, T0);
        a.mmio_write(reg::LVT_LINT0, 0x700, T0);
        a.mmio_write(reg::TIMER_DIVIDE, 0xB, T0);
        a.mmio_write(reg::TIMER_INITIAL, 100, T0);
        a.set_irr(0x60, false);
        a.mmio_write(reg::SVR, 0xFF, Nanos(10));
        assert!(!a.sw_enabled());
        assert_eq!(a.pending(), None);
        for off in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16) {
            assert_ne!(a.mmio_read(off, Nanos(10)) & LVT_MASKED, 0, "{off:#x}");
        }
        a.mmio_write(reg::LVT_TIMER, 1 << 17 | 0x30, Nanos(20));
        assert_eq!(a.mmio_read(reg::LVT_TIMER, Nanos(20)), LVT_MASKED | 1 << 17 | 0x30, "stays masked");
        assert!(!a.accepts_pic_interrupts());
        a.tick(Nanos(1000));
        a.set_irr(0x61, false);
        a.mmio_write(reg::SVR, 0x1FF, Nanos(1000));
        assert_eq!(a.pending(), Some(0x60), "held IRR bits survive; new ones were refused");
        assert_eq!(a.acknowledge(), Some(0x60));
        a.eoi();
        assert_eq!(a.pending(), None);
        assert_eq!(a.next_deadline(), None, "the timer LVT is still masked");
    }

    #[test]
    fn mmio_edge_cases_and_time_going_backwards() {
        let mut a = enabled();
        a.mmio_write(reg::TPR, 0xA5, T0);
        assert_eq!(a.mmio_read(reg::TPR + 1, T0), 0xA5 >> 8);
        assert_eq!(a.mmio_read(reg::TPR + 4, T0), 0);
        a.mmio_write(reg::TPR + 4, 0, T0);
        assert_eq!(a.mmio_read(reg::TPR, T0), 0xA5);
        assert_eq!(a.mmio_read(reg::TPR | 0x1000, T0), 0xA5, "offsets wrap in the page");
        a.mmio_read(reg::CMCI, T0);
        a.mmio_write(reg::ESR, 0, T0);
        assert_eq!(a.mmio_read(reg::ESR, T0), ESR_ILLEGAL_REGISTER);
        // An unmasked error LVT raises its vector.
        a.mmio_write(reg::TPR, 0, T0);
        a.mmio_write(reg::LVT_ERROR, 0xFE, T0);
        a.mmio_write(reg::SELF_IPI, 0x20, T0);
        assert_eq!(a.pending(), Some(0xFE));
        // Time going backwards counts as the latest time seen.
        let mut b = enabled();
        b.mmio_write(reg::LVT_TIMER, 0x31, Nanos(100));
        b.mmio_write(reg::TIMER_DIVIDE, 0xB, Nanos(100));
        b.mmio_write(reg::TIMER_INITIAL, 10, Nanos(50));
        assert_eq!(b.next_deadline(), Some(Nanos(110)));
    }

    #[test]
    fn arbitrary_accesses_never_panic() {
        let mut seed = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for hz in [0, 1, DEFAULT_TIMER_HZ, u64::MAX] {
            let mut a = LocalApic::new(u32::MAX, true, hz);
            let mut now = 0u64;
            for _ in 0..20_000 {
                let r = next();
                now = now.wrapping_add(r >> 50);
                let t = Nanos(if r & 1 << 40 != 0 { u64::MAX - (r >> 45) } else { now });
                let v = next();
                match r % 9 {
                    0 => a.mmio_write(r as u32 >> 8, v as u32, t),
                    1 => _ = a.mmio_read(r as u32 >> 8, t),
                    2 => _ = a.msr_write(0x800 + (r as u32 >> 8) % 0x100, v >> (r >> 58), t),
                    3 => _ = a.msr_read(0x800 + (r as u32 >> 8) % 0x100, t),
                    4 => _ = a.set_apic_base(v & (0xFFF | DEFAULT_APIC_BASE)),
                    5 => a.set_irr(v as u8, v & 256 != 0),
                    6 => _ = (a.acknowledge(), a.eoi_broadcast_vector(), a.pending()),
                    7 => a.write_tsc_deadline(v, Nanos(v >> (r >> 58)), t),
                    _ if r & 1 << 41 != 0 => {
                        let modes = [DeliveryMode::Fixed, DeliveryMode::Nmi, DeliveryMode::Init, DeliveryMode::Startup];
                        let m = Message {
                            mode: modes[(v >> 8) as usize % modes.len()],
                            vector: v as u8,
                            level_assert: v & 1 << 20 != 0,
                            trigger_level: v & 1 << 21 != 0,
                            dest: Destination::Physical(v as u32 >> 24),
                        };
                        if a.matches(m.dest, v & 1 << 22 != 0) {
                            a.accept(&m);
                        }
                        _ = (a.take_ipi(), a.take_init(), a.take_sipi(), a.take_nmi(), a.take_extint());
                    }
                    _ => {
                        a.tick(t);
                        _ = a.next_deadline();
                        a.eoi();
                    }
                }
            }
        }
    }
}
