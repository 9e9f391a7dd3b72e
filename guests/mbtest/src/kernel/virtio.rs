//! `mode=virtio`: hostile descriptors against the VM's virtio-console (the VM line's
//! `virtio=console`), as a driver that breaks the rules would write them.
//!
//! The function is found through PCI configuration mechanism #1 (ports 0xCF8/0xCFC, bus 0),
//! its memory BAR placed at the start of the root bridge's window (3 GiB for a VM of less
//! RAM, where the DSDT's `_CRS` puts it) unless it already has an address, memory decoding
//! and bus mastering turned on, and its common configuration, notify and ISR areas found
//! through the vendor capabilities (virtio 1.2 §4.1.4: ID 0x09, cfg_type 1, 2, 3, 5). For each
//! case the driver initialises the device (§3.1.1: reset, ACKNOWLEDGE, DRIVER, VERSION_1 and
//! INDIRECT_DESC, FEATURES_OK, queue 1 — the port's transmitq — of 8 entries in this kernel's
//! memory, DRIVER_OK), publishes one broken chain (§2.7), notifies, and checks that the
//! device says DEVICE_NEEDS_RESET (status bit 64, §2.1.2), sent a configuration change (ISR
//! bit 1), left the used ring alone, and comes back to status 0 on reset. The cases:
//! - `loop`: descriptor 0 -> 1 -> 0;
//! - `past_ram`: a buffer running past the end of RAM (fw_cfg's RAM size);
//! - `mmio_lapic`: a buffer in the local APIC page (0xFEE00000);
//! - `mmio_bar`: a buffer in the device's own BAR;
//! - `too_long`: an indirect table of 16 chained descriptors in a queue of 8 (§2.7.5.2);
//! - `avail_jump`: the available index 9 entries ahead in a queue of 8 (§2.7.13.3);
//! - `head_range`: a chain head (200) outside the descriptor table;
//! - `next_range`: a `next` index (8) outside a table of 8;
//! - `ring_mmio`: the descriptor table itself in the local APIC page (an error at queue
//!   enable, before DRIVER_OK: no configuration change is due, §2.1.2);
//! - `cfg_window`: the looping chain, notified through the PCI configuration access
//!   capability (cfg_type 5, §4.1.4.9) instead of the notify area.
//!
//! Then a good request after the last reset: one buffer with [`GOOD_TEXT`], which must come
//! back through the used ring (id 0, 0 bytes written) while the status stays without
//! NEEDS_RESET; its text is the VM's console output on Vireo's side.

use core::fmt::Write;

use super::{inl, outl, Serial, Tally};

const VENDOR: u32 = 0x1AF4;
/// virtio-console: 0x1040 + device type 3 (§4.1.2.1).
const DEVICE: u32 = 0x1043;
/// Where the BAR goes when it has no address yet: the bottom of the root bridge's window.
const BAR_DEFAULT: u32 = 0xC000_0000;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_VERSION_1: u64 = 1 << 32;

/// `struct virtio_pci_common_cfg` offsets (§4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// The console's transmitq (port 0, §5.3.2) and the size the driver gives it.
const TRANSMITQ: u16 = 1;
const QSIZE: u16 = 8;

/// Descriptor flags (§2.7.5).
const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;

/// What the good request writes.
pub const GOOD_TEXT: &[u8] = b"virtio-console: good write after reset\n";

/// The queue's memory, one page per part: descriptor table, available ring, used ring,
/// an indirect table and a data buffer.
#[repr(C, align(4096))]
struct Area([u8; 0x5000]);
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const INDIRECT: u64 = 0x3000;
const DATA: u64 = 0x4000;
/// Written over the used ring before each case: what the device must leave there.
const USED_SENTINEL: u32 = 0xA5A5_A5A5;
/// The local APIC page: MMIO, never RAM.
const LAPIC: u64 = 0xFEE0_0000;

static mut AREA: Area = Area([0; 0x5000]);

fn area() -> u64 {
    core::ptr::addr_of_mut!(AREA) as u64
}

fn put<T>(gpa: u64, v: T) {
    // SAFETY: `gpa` is inside AREA (identity-mapped RAM of this kernel, which only this
    // code touches); x86 tolerates unaligned access.
    unsafe { (gpa as *mut T).write_volatile(v) }
}

fn get<T>(gpa: u64) -> T {
    // SAFETY: as in `put`.
    unsafe { (gpa as *const T).read_volatile() }
}

/// A register in the device's BAR: plain `mov`s, as drivers access device memory (the
/// compiler could fold a volatile read into another instruction, which an MMIO exit need
/// not emulate).
trait Mmio: Sized {
    fn read(at: u64) -> Self;
    fn write(at: u64, v: Self);
}

macro_rules! mmio {
    ($t:ty, $reg:literal) => {
        impl Mmio for $t {
            fn read(at: u64) -> Self {
                let v: $t;
                // SAFETY: `at` is in the device's BAR (identity-mapped by the entry code's
                // upper table); reading a register has no effect on this kernel's memory.
                unsafe {
                    core::arch::asm!(concat!("mov {v", $reg, "}, [{at}]"), at = in(reg) at, v = out(reg) v, options(nostack))
                };
                v
            }
            fn write(at: u64, v: Self) {
                // SAFETY: as in `read`; the device reads guest memory this kernel set up.
                unsafe {
                    core::arch::asm!(concat!("mov [{at}], {v", $reg, "}"), at = in(reg) at, v = in(reg) v, options(nostack))
                };
            }
        }
    };
}

mmio!(u16, ":x");
mmio!(u32, ":e");

impl Mmio for u8 {
    fn read(at: u64) -> Self {
        let v: u8;
        // SAFETY: as for the wider registers.
        unsafe { core::arch::asm!("mov {v}, byte ptr [{at}]", at = in(reg) at, v = out(reg_byte) v, options(nostack)) };
        v
    }
    fn write(at: u64, v: Self) {
        // SAFETY: as for the wider registers.
        unsafe { core::arch::asm!("mov byte ptr [{at}], {v}", at = in(reg) at, v = in(reg_byte) v, options(nostack)) };
    }
}

fn mmio_put<T: Mmio>(at: u64, v: T) {
    T::write(at, v);
}

fn mmio_get<T: Mmio>(at: u64) -> T {
    T::read(at)
}

/// A descriptor (§2.7.5) at `table[index]`.
fn desc(table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + 16 * u64::from(index);
    put(at, addr);
    put(at + 8, len);
    put(at + 12, flags);
    put(at + 14, next);
}

fn cfg_addr(dev: u8, off: u8) -> u32 {
    0x8000_0000 | u32::from(dev) << 11 | u32::from(off & 0xFC)
}

fn cfg_read(dev: u8, off: u8) -> u32 {
    outl(0xCF8, cfg_addr(dev, off));
    inl(0xCFC) >> (8 * u32::from(off & 3))
}

fn cfg_write(dev: u8, off: u8, v: u32) {
    outl(0xCF8, cfg_addr(dev, off));
    outl(0xCFC, v);
}

/// The device's BAR areas.
#[derive(Clone, Copy)]
struct Dev {
    slot: u8,
    /// The PCI configuration access capability's offset in configuration space.
    window: u8,
    bar: u64,
    common: u64,
    notify: u64,
    notify_mult: u32,
    isr: u64,
}

/// Finds the virtio-console on bus 0 and turns its BAR on.
fn find() -> Result<Dev, &'static str> {
    let slot = (0..32u8).find(|&d| cfg_read(d, 0) == DEVICE << 16 | VENDOR).ok_or("no virtio-console on bus 0")?;
    let mut bar = cfg_read(slot, 0x10) & !0xF;
    if bar == 0 {
        cfg_write(slot, 0x10, BAR_DEFAULT);
        bar = cfg_read(slot, 0x10) & !0xF;
    }
    // Command: memory space (bit 1) and bus master (bit 2).
    let command = cfg_read(slot, 0x04) & 0xFFFF;
    cfg_write(slot, 0x04, command | 0x6);
    if cfg_read(slot, 0x06) & 0x10 == 0 {
        return Err("no capability list");
    }
    let bar = u64::from(bar);
    let (mut common, mut notify, mut notify_mult, mut isr, mut window) = (None, None, 0, None, None);
    let mut p = (cfg_read(slot, 0x34) & 0xFC) as u8;
    for _ in 0..48 {
        if p == 0 {
            break;
        }
        let head = cfg_read(slot, p);
        if head & 0xFF == 0x09 && cfg_read(slot, p + 4) & 0xFF == 0 {
            let at = bar + u64::from(cfg_read(slot, p + 8));
            match (head >> 24) as u8 {
                1 => common = Some(at),
                2 => {
                    notify = Some(at);
                    notify_mult = cfg_read(slot, p + 16);
                }
                3 => isr = Some(at),
                5 => window = Some(p),
                _ => {}
            }
        }
        p = ((head >> 8) & 0xFC) as u8;
    }
    let _ = writeln!(Serial, "mbtest: virtio device 00:{slot:02x}.0 bar={bar:#x}");
    Ok(Dev {
        slot,
        window: window.ok_or("no PCI configuration access capability")?,
        bar,
        common: common.ok_or("no common configuration capability")?,
        notify: notify.ok_or("no notify capability")?,
        notify_mult,
        isr: isr.ok_or("no ISR capability")?,
    })
}

impl Dev {
    fn status(&self) -> u8 {
        mmio_get(self.common + DEVICE_STATUS)
    }

    fn set_status(&self, s: u8) {
        mmio_put(self.common + DEVICE_STATUS, s);
    }

    /// Writes 0 and waits for the status to read 0 (§4.1.4.3.2).
    fn reset(&self) -> bool {
        self.set_status(0);
        (0..1000).any(|_| self.status() == 0)
    }

    /// The driver's side of §3.1.1 with queue [`TRANSMITQ`] of [`QSIZE`] in [`AREA`], which
    /// is cleared (the used ring filled with [`USED_SENTINEL`]), its descriptor table at
    /// `desc_at`. Returns the queue's notify address.
    fn init(&self, features: &mut u64, desc_at: u64) -> Result<u64, &'static str> {
        if !self.reset() {
            return Err("reset did not read back 0");
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            mmio_put(self.common + DEVICE_FEATURE_SELECT, sel);
            offered |= u64::from(mmio_get::<u32>(self.common + DEVICE_FEATURE)) << (32 * sel);
        }
        *features = offered & (F_VERSION_1 | F_INDIRECT_DESC);
        for sel in 0..2u32 {
            mmio_put(self.common + DRIVER_FEATURE_SELECT, sel);
            mmio_put(self.common + DRIVER_FEATURE, (*features >> (32 * sel)) as u32);
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("FEATURES_OK did not stick");
        }
        let base = area();
        for i in 0..0x3000u64 {
            put::<u8>(base + i, 0);
        }
        for i in 0..(4 + 8 * u64::from(QSIZE)) / 4 {
            put(base + USED + 4 * i, USED_SENTINEL);
        }
        put::<u16>(base + USED + 2, 0);
        mmio_put(self.common + QUEUE_SELECT, TRANSMITQ);
        if mmio_get::<u16>(self.common + QUEUE_SIZE) < QSIZE {
            return Err("queue too small");
        }
        mmio_put(self.common + QUEUE_SIZE, QSIZE);
        mmio_put(self.common + QUEUE_MSIX_VECTOR, 0xFFFFu16);
        for (reg, at) in [(QUEUE_DESC, desc_at), (QUEUE_DRIVER, base + AVAIL), (QUEUE_DEVICE, base + USED)] {
            // 64-bit fields as two 32-bit writes (§4.1.3.1).
            mmio_put(self.common + reg, at as u32);
            mmio_put(self.common + reg + 4, (at >> 32) as u32);
        }
        let notify_off = mmio_get::<u16>(self.common + QUEUE_NOTIFY_OFF);
        mmio_put(self.common + QUEUE_ENABLE, 1u16);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        Ok(self.notify + u64::from(notify_off) * u64::from(self.notify_mult))
    }

    /// Makes `count` chains available (heads 0, 1, ... unless `build` put others in the
    /// ring; the available index `count`, which is written last) and notifies the queue.
    fn publish(&self, notify: u64, count: u16) {
        let base = area();
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        put(base + AVAIL + 2, count);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        mmio_put(notify, TRANSMITQ);
    }

    /// Notifies the queue through the PCI configuration access window (§4.1.4.9): bar 0,
    /// the notify address's offset in it, length 2, then the queue index to pci_cfg_data.
    fn notify_through_window(&self, notify: u64) {
        let p = self.window;
        cfg_write(self.slot, p + 4, 0);
        cfg_write(self.slot, p + 8, (notify - self.bar) as u32);
        cfg_write(self.slot, p + 12, 2);
        cfg_write(self.slot, p + 16, u32::from(TRANSMITQ));
    }
}

/// The hostile cases: name, and how the descriptor table (and the available index) is set.
fn build(case: &str, dev: &Dev, ram: u64) -> u16 {
    let base = area();
    let data = base + DATA;
    for i in 0..QSIZE {
        put(base + AVAIL + 4 + 2 * u64::from(i), i);
    }
    match case {
        "loop" | "cfg_window" => {
            desc(base + DESC, 0, data, 16, F_NEXT, 1);
            desc(base + DESC, 1, data + 16, 16, F_NEXT, 0);
            1
        }
        "past_ram" => {
            desc(base + DESC, 0, ram - 0x100, 0x1000, 0, 0);
            1
        }
        "mmio_lapic" => {
            desc(base + DESC, 0, LAPIC, 0x10, 0, 0);
            1
        }
        "mmio_bar" => {
            desc(base + DESC, 0, dev.bar, 0x100, 0, 0);
            1
        }
        "too_long" => {
            for i in 0..16u16 {
                let last = i == 15;
                desc(base + INDIRECT, i, data + u64::from(i), 1, if last { 0 } else { F_NEXT }, i + 1);
            }
            desc(base + DESC, 0, base + INDIRECT, 16 * 16, F_INDIRECT, 0);
            1
        }
        "avail_jump" => {
            for i in 0..QSIZE {
                desc(base + DESC, i, data, 1, 0, 0);
            }
            QSIZE + 1
        }
        "head_range" => {
            desc(base + DESC, 0, data, 1, 0, 0);
            put::<u16>(base + AVAIL + 4, 200);
            1
        }
        "next_range" => {
            desc(base + DESC, 0, data, 1, F_NEXT, QSIZE);
            1
        }
        "ring_mmio" => {
            desc(base + DESC, 0, data, 1, 0, 0);
            1
        }
        _ => 0,
    }
}

pub const CASES: [&str; 10] = [
    "loop",
    "past_ram",
    "mmio_lapic",
    "mmio_bar",
    "too_long",
    "avail_jump",
    "head_range",
    "next_range",
    "ring_mmio",
    "cfg_window",
];

/// Runs the cases and the good request; `ram` is the VM's RAM size.
pub fn run(t: &mut Tally, ram: u64) {
    let dev = match find() {
        Ok(d) => d,
        Err(e) => {
            t.check("virtio_found", false, format_args!("{e}"));
            return;
        }
    };
    t.check("virtio_found", true, format_args!("bar={:#x}", dev.bar));
    let base = area();
    for case in CASES {
        let mut features = 0;
        let desc_at = if case == "ring_mmio" { LAPIC } else { base + DESC };
        let notify = match dev.init(&mut features, desc_at) {
            Ok(n) => n,
            Err(e) => {
                t.check("virtio_hostile", false, format_args!("case={case} init: {e}"));
                continue;
            }
        };
        let count = build(case, &dev, ram);
        if case == "cfg_window" {
            put(base + AVAIL + 2, count);
            dev.notify_through_window(notify);
        } else {
            dev.publish(notify, count);
        }
        let status = dev.status();
        let used_idx: u16 = get(base + USED + 2);
        let used0: u32 = get(base + USED + 4);
        let isr: u8 = mmio_get(dev.isr);
        let reset = dev.reset();
        let needs_reset = status & STATUS_NEEDS_RESET != 0;
        // A configuration change notification (ISR bit 1) only for an error after DRIVER_OK.
        let config_isr = if case == "ring_mmio" { 0 } else { 2 };
        t.check(
            "virtio_hostile",
            needs_reset && used_idx == 0 && used0 == USED_SENTINEL && isr & 2 == config_isr && reset,
            format_args!(
                "case={case} needs_reset={} status={status:#x} used_idx={used_idx} used_untouched={} isr={isr:#x} reset={} features={features:#x}",
                u8::from(needs_reset),
                u8::from(used0 == USED_SENTINEL),
                if reset { "ok" } else { "stuck" }
            ),
        );
    }
    // A good request after the last reset.
    let mut features = 0;
    match dev.init(&mut features, base + DESC) {
        Ok(notify) => {
            for (i, b) in GOOD_TEXT.iter().enumerate() {
                put(base + DATA + i as u64, *b);
            }
            desc(base + DESC, 0, base + DATA, GOOD_TEXT.len() as u32, 0, 0);
            dev.publish(notify, 1);
            let status = dev.status();
            let used_idx: u16 = get(base + USED + 2);
            let (id, len): (u32, u32) = (get(base + USED + 4), get(base + USED + 8));
            t.check(
                "virtio_good",
                status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
                    && used_idx == 1
                    && id == 0
                    && len == 0,
                format_args!("status={status:#x} used_idx={used_idx} used_id={id} used_len={len}"),
            );
            dev.reset();
        }
        Err(e) => t.check("virtio_good", false, format_args!("init: {e}")),
    }
}
