//! The device bus: a VM's devices register port ranges and guest-physical (MMIO) ranges and
//! implement one small trait, [`Device`]. The run loop asks the bus, never a concrete device.
//!
//! Each device sits behind its own lock, so vCPUs touching different devices never contend;
//! a lookup finds the range an address falls in (ranges never overlap: [`Bus::add`] refuses
//! an overlap and names both devices). Devices see absolute addresses (a port number or a
//! guest-physical address) and the access size; values are up to 64 bits wide.
//!
//! A port access first tries the range the last port access hit (one load and two compares:
//! a guest's console or timer loop keeps hitting the same device), then the map.

use alloc::{collections::BTreeMap, sync::Arc, vec::Vec};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use spin::Mutex;

use super::time::Nanos;
use crate::vmm::guest_mem::GuestMemory;

/// The two address spaces of a PC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// Port I/O (IN/OUT), 16-bit addresses.
    Port,
    /// Guest-physical addresses with no RAM behind them.
    Mmio,
}

/// `[start, start + len)` in one space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub space: Space,
    pub start: u64,
    pub len: u64,
}

impl Range {
    pub const fn port(start: u16, len: u16) -> Self {
        Self { space: Space::Port, start: start as u64, len: len as u64 }
    }

    pub const fn mmio(start: u64, len: u64) -> Self {
        Self { space: Space::Mmio, start, len }
    }

    const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = match self.space {
            Space::Port => "port",
            Space::Mmio => "mmio",
        };
        write!(f, "{space} {:#x}-{:#x}", self.start, self.end().saturating_sub(1))
    }
}

/// What an access asks of the VM beyond its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusEffect {
    None,
    /// The guest turned its machine off (ACPI S5).
    PowerOff,
    /// The guest reset its machine (reset register, keyboard controller, port 0x92).
    Reset,
    /// The guest ended its machine with this status (QEMU's `isa-debug-exit`).
    Exit(u64),
}

/// What a device may use while it handles an access or a tick.
pub struct Ctx<'a> {
    /// Guest time: nanoseconds since the VM started.
    pub now: Nanos,
    /// The VM's RAM, with checked access (DMA, virtqueues).
    pub mem: &'a GuestMemory,
}

/// One device on the bus.
pub trait Device: Send {
    /// A short name for reports ("uart", "pit").
    fn name(&self) -> &'static str;
    /// A read of `size` bytes (1, 2, 4 or 8) at absolute address `addr`.
    fn read(&mut self, addr: u64, size: u8, cx: &Ctx<'_>) -> u64;
    /// A write of the low `size` bytes of `value` at `addr`.
    fn write(&mut self, addr: u64, size: u8, value: u64, cx: &Ctx<'_>) -> BusEffect;
    /// Brings the device's timers to `cx.now` and its interrupt lines up to date.
    fn tick(&mut self, _cx: &Ctx<'_>) {}
    /// The earliest guest time the device needs a [`Device::tick`].
    fn next_deadline(&self) -> Option<Nanos> {
        None
    }
}

pub type DeviceRef = Arc<Mutex<dyn Device>>;

/// Two devices claimed the same addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub new: &'static str,
    pub new_range: Range,
    pub existing: &'static str,
    pub existing_range: Range,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device {} at {} overlaps device {} at {}",
            self.new, self.new_range, self.existing, self.existing_range
        )
    }
}

struct Entry {
    end: u64,
    device: usize,
}

#[derive(Default)]
pub struct Bus {
    ports: BTreeMap<u64, Entry>,
    mmio: BTreeMap<u64, Entry>,
    devices: Vec<(&'static str, DeviceRef)>,
    /// The port range the last port lookup found ([`PortHint`]), 0 for none. Any vCPU may
    /// replace it; each value names a range and device of `ports`, which do not change while
    /// the bus is shared (`add` takes `&mut self` and clears it).
    port_hint: AtomicU64,
}

/// A port range and its device index packed in 64 bits: bits 0-16 the end (exclusive, up to
/// 0x10000), bits 17-32 the start, bits 33-63 the device index plus 1 (so 0 is no hint).
struct PortHint;

impl PortHint {
    fn pack(start: u64, end: u64, device: usize) -> u64 {
        debug_assert!(start <= 0xFFFF && end <= 0x1_0000 && device < (1 << 30));
        ((device as u64 + 1) << 33) | (start << 17) | end
    }

    /// The device index if `hint` covers port `addr`.
    #[inline]
    fn device(hint: u64, addr: u64) -> Option<usize> {
        let (start, end) = ((hint >> 17) & 0xFFFF, hint & 0x1_FFFF);
        (hint != 0 && start <= addr && addr < end).then(|| (hint >> 33) as usize - 1)
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self, space: Space) -> &BTreeMap<u64, Entry> {
        match space {
            Space::Port => &self.ports,
            Space::Mmio => &self.mmio,
        }
    }

    /// The range holding `addr` and its device index.
    fn lookup(&self, space: Space, addr: u64) -> Option<(u64, &Entry)> {
        let (&start, entry) = self.map(space).range(..=addr).next_back()?;
        (addr < entry.end).then_some((start, entry))
    }

    /// Adds `device` at `ranges` (all or none: an overlap, with another device or among
    /// `ranges`, is refused and names both).
    pub fn add(&mut self, device: DeviceRef, ranges: &[Range]) -> Result<(), Overlap> {
        let name = device.lock().name();
        for (i, r) in ranges.iter().enumerate() {
            let clash = |other: &Range| other.space == r.space && other.start < r.end() && r.start < other.end();
            if let Some(o) = ranges[..i].iter().find(|o| clash(o)) {
                return Err(Overlap { new: name, new_range: *r, existing: name, existing_range: *o });
            }
            for (&start, e) in self.map(r.space).range(..r.end()) {
                let existing = Range { space: r.space, start, len: e.end - start };
                if clash(&existing) {
                    let existing_name = self.devices[e.device].0;
                    return Err(Overlap {
                        new: name,
                        new_range: *r,
                        existing: existing_name,
                        existing_range: existing,
                    });
                }
            }
        }
        let index = self.devices.len();
        self.devices.push((name, device));
        *self.port_hint.get_mut() = 0;
        for r in ranges.iter().filter(|r| r.len > 0) {
            let map = match r.space {
                Space::Port => &mut self.ports,
                Space::Mmio => &mut self.mmio,
            };
            map.insert(r.start, Entry { end: r.end(), device: index });
        }
        Ok(())
    }

    /// The device at `addr`, if any.
    #[inline]
    pub fn find(&self, space: Space, addr: u64) -> Option<&DeviceRef> {
        if space == Space::Port {
            if let Some(i) = PortHint::device(self.port_hint.load(Relaxed), addr) {
                return self.devices.get(i).map(|(_, d)| d);
            }
            // Ports are 16-bit: a range of `ports` never ends beyond 0x10000 (the IN/OUT
            // exits give 16-bit port numbers; `add` refuses nothing larger, so check here).
            let (start, e) = self.lookup(space, addr)?;
            if e.end <= 0x1_0000 && e.device < (1 << 30) {
                self.port_hint.store(PortHint::pack(start, e.end, e.device), Relaxed);
            }
            return Some(&self.devices[e.device].1);
        }
        self.lookup(space, addr).map(|(_, e)| &self.devices[e.device].1)
    }

    /// A read; `None` if no device claims `addr` (the caller answers as an empty bus).
    pub fn read(&self, space: Space, addr: u64, size: u8, cx: &Ctx<'_>) -> Option<u64> {
        self.read_with_deadline(space, addr, size, cx).map(|(v, _)| v)
    }

    /// A write; `None` if no device claims `addr`.
    pub fn write(&self, space: Space, addr: u64, size: u8, value: u64, cx: &Ctx<'_>) -> Option<BusEffect> {
        self.write_with_deadline(space, addr, size, value, cx).map(|(e, _)| e)
    }

    /// [`Bus::read`], also returning the device's next deadline after the access (an access
    /// may program a timer).
    pub fn read_with_deadline(&self, space: Space, addr: u64, size: u8, cx: &Ctx<'_>) -> Option<(u64, Option<Nanos>)> {
        let mut dev = self.find(space, addr)?.lock();
        let v = dev.read(addr, size, cx);
        Some((v, dev.next_deadline()))
    }

    /// [`Bus::write`], also returning the device's next deadline after the access.
    pub fn write_with_deadline(
        &self,
        space: Space,
        addr: u64,
        size: u8,
        value: u64,
        cx: &Ctx<'_>,
    ) -> Option<(BusEffect, Option<Nanos>)> {
        let mut dev = self.find(space, addr)?.lock();
        let e = dev.write(addr, size, value, cx);
        Some((e, dev.next_deadline()))
    }

    /// Ticks every device whose deadline has come; returns the earliest deadline left.
    pub fn tick(&self, cx: &Ctx<'_>) -> Option<Nanos> {
        let mut next: Option<Nanos> = None;
        for (_, dev) in &self.devices {
            let mut d = dev.lock();
            if d.next_deadline().is_some_and(|t| t <= cx.now) {
                d.tick(cx);
            }
            next = super::time::earliest(next, d.next_deadline());
        }
        next
    }

    /// Ticks every device (after a VM-wide event such as a restart).
    pub fn tick_all(&self, cx: &Ctx<'_>) {
        for (_, dev) in &self.devices {
            dev.lock().tick(cx);
        }
    }

    /// The earliest guest time any device needs a tick.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.devices.iter().fold(None, |acc, (_, d)| super::time::earliest(acc, d.lock().next_deadline()))
    }

    /// Device names in the order they were added.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.devices.iter().map(|(n, _)| *n)
    }
}

/// Wraps a device for the bus.
pub fn device<D: Device + 'static>(d: D) -> Arc<Mutex<D>> {
    Arc::new(Mutex::new(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::FrameAllocator;

    struct Reg {
        name: &'static str,
        value: u64,
        last: Option<(u64, u8)>,
    }

    impl Device for Reg {
        fn name(&self) -> &'static str {
            self.name
        }
        fn read(&mut self, addr: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
            self.last = Some((addr, size));
            self.value
        }
        fn write(&mut self, addr: u64, size: u8, value: u64, _cx: &Ctx<'_>) -> BusEffect {
            self.last = Some((addr, size));
            self.value = value;
            if value == 0xDEAD {
                BusEffect::PowerOff
            } else {
                BusEffect::None
            }
        }
    }

    fn reg(name: &'static str) -> Arc<Mutex<Reg>> {
        device(Reg { name, value: 0, last: None })
    }

    #[test]
    fn lookup_finds_the_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        let a = reg("a");
        bus.add(a.clone(), &[Range::port(0x40, 4), Range::mmio(0xFEC0_0000, 0x1000)]).unwrap();
        let b = reg("b");
        let err = bus.add(b.clone(), &[Range::port(0x43, 2)]).unwrap_err();
        assert_eq!(err.existing, "a");
        assert_eq!(err.new, "b");
        assert_eq!(alloc::format!("{err}"), "device b at port 0x43-0x44 overlaps device a at port 0x40-0x43");
        // Refused as a whole: nothing of b was added.
        assert!(bus.find(Space::Port, 0x44).is_none());
        bus.add(b.clone(), &[Range::port(0x44, 1)]).unwrap();
        // The same address in the other space is separate.
        bus.add(reg("c"), &[Range::mmio(0x40, 4)]).unwrap();
        assert!(bus.add(reg("d"), &[Range::port(0x10, 4), Range::port(0x12, 1)]).is_err());

        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        assert_eq!(bus.write(Space::Port, 0x42, 1, 7, &cx), Some(BusEffect::None));
        assert_eq!(a.lock().last, Some((0x42, 1)));
        assert_eq!(bus.read(Space::Port, 0x43, 2, &cx), Some(7));
        assert_eq!(bus.write(Space::Port, 0x44, 1, 0xDEAD, &cx), Some(BusEffect::PowerOff));
        assert_eq!(bus.read(Space::Port, 0x45, 1, &cx), None);
        assert_eq!(bus.read(Space::Port, 0x3F, 1, &cx), None);
        assert_eq!(bus.read(Space::Mmio, 0xFEC0_0FFF, 4, &cx), Some(7));
        assert_eq!(bus.read(Space::Mmio, 0xFEC0_1000, 4, &cx), None);
        assert_eq!(bus.names().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn port_hint_follows_the_last_range() {
        let same = |x: Option<&DeviceRef>, y: &DeviceRef| x.is_some_and(|x| Arc::ptr_eq(x, y));
        let mut bus = Bus::new();
        let (a, b) = (reg("a"), reg("b"));
        let (a_ref, b_ref): (DeviceRef, DeviceRef) = (a.clone(), b.clone());
        bus.add(a, &[Range::port(0x3F8, 8)]).unwrap();
        bus.add(b, &[Range::port(0x400, 1), Range::port(0xFFFF, 1)]).unwrap();
        for _ in 0..2 {
            assert!(same(bus.find(Space::Port, 0x3FD), &a_ref));
            assert!(same(bus.find(Space::Port, 0x3F8), &a_ref), "hit through the hint");
            assert!(bus.find(Space::Port, 0x3F7).is_none(), "below the hinted range");
            assert!(same(bus.find(Space::Port, 0x400), &b_ref), "past its end: the map");
            assert!(bus.find(Space::Port, 0x401).is_none());
            assert!(same(bus.find(Space::Port, 0xFFFF), &b_ref), "a range ending at 0x10000");
            assert!(bus.find(Space::Port, 0x3FF).is_some_and(|d| Arc::ptr_eq(d, &a_ref)));
            assert!(bus.find(Space::Mmio, 0x3F8).is_none(), "the hint is for ports only");
        }
        // Adding a device drops the hint; the new device is found.
        let c = reg("c");
        let c_ref: DeviceRef = c.clone();
        bus.add(c, &[Range::port(0x3F0, 8)]).unwrap();
        assert!(same(bus.find(Space::Port, 0x3F0), &c_ref));
        assert_eq!(PortHint::device(PortHint::pack(0x3F0, 0x3F8, 2), 0x3F7), Some(2));
        assert_eq!(PortHint::device(PortHint::pack(0x3F0, 0x3F8, 2), 0x3F8), None);
        assert_eq!(PortHint::device(0, 0), None);
    }
}
