//! kvmclock (pvclock, shared with Xen): a per-vCPU record from which the guest computes
//! nanoseconds out of its own TSC reads, without exits.
//!
//! Every vCPU gets the same record: `tsc_timestamp` = the VM's start TSC, `system_time` = 0,
//! and the one (mul, shift) of the host TSC rate. Guests run on the host TSC (no offset, no
//! scaling), so the record never needs updating, and all vCPUs compute the same time from
//! the same TSC value: with synchronized host TSCs that is a single monotonic clock, which
//! the TSC-stable flag tells the guest (its vDSO then reads time in user mode).

use guest_abi::kvm::pvclock;

use crate::vmm::guest_mem::{GuestMemError, GuestMemory};

/// The fields of a `pvclock_vcpu_time_info` (the version is managed by [`write`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeInfo {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub mul: u32,
    pub shift: i8,
    pub flags: u8,
}

impl TimeInfo {
    /// The record for a VM started at `start_tsc` on a `tsc_hz` TSC.
    pub fn for_vm(start_tsc: u64, tsc_hz: u64, stable: bool) -> Option<Self> {
        let (mul, shift) = guest_abi::kvm::time_scale(tsc_hz)?;
        Some(Self {
            tsc_timestamp: start_tsc,
            system_time: 0,
            mul,
            shift,
            flags: if stable { pvclock::TSC_STABLE } else { 0 },
        })
    }

    /// Guest nanoseconds at `tsc`, as the guest computes them.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        self.system_time.wrapping_add(guest_abi::kvm::scale_delta(
            tsc.wrapping_sub(self.tsc_timestamp),
            self.mul,
            self.shift,
        ))
    }
}

/// Writes `info` at `gpa` with the version protocol: the version goes odd, the fields
/// change, the version goes even again (readers retry while it is odd or changed).
pub fn write(mem: &GuestMemory, gpa: u64, info: &TimeInfo) -> Result<(), GuestMemError> {
    let mut version = [0u8; 4];
    mem.read(gpa + pvclock::VERSION as u64, &mut version)?;
    let v = u32::from_le_bytes(version);
    let odd = (v.wrapping_add(1)) | 1;
    mem.write(gpa + pvclock::VERSION as u64, &odd.to_le_bytes())?;
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    let mut body = [0u8; pvclock::SIZE - 8];
    body[0..8].copy_from_slice(&info.tsc_timestamp.to_le_bytes());
    body[8..16].copy_from_slice(&info.system_time.to_le_bytes());
    body[16..20].copy_from_slice(&info.mul.to_le_bytes());
    body[20] = info.shift as u8;
    body[21] = info.flags;
    mem.write(gpa + pvclock::TSC_TIMESTAMP as u64, &body)?;
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    mem.write(gpa + pvclock::VERSION as u64, &odd.wrapping_add(1).to_le_bytes())
}

/// Writes a `pvclock_wall_clock` at `gpa`: the Unix time at guest time 0 (the guest adds
/// its kvmclock reading).
pub fn write_wall_clock(mem: &GuestMemory, gpa: u64, wall_at_start_ns: u64) -> Result<(), GuestMemError> {
    let mut version = [0u8; 4];
    mem.read(gpa, &mut version)?;
    let odd = u32::from_le_bytes(version).wrapping_add(1) | 1;
    mem.write(gpa, &odd.to_le_bytes())?;
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    let sec = (wall_at_start_ns / 1_000_000_000) as u32;
    let nsec = (wall_at_start_ns % 1_000_000_000) as u32;
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&sec.to_le_bytes());
    body[4..].copy_from_slice(&nsec.to_le_bytes());
    mem.write(gpa + 4, &body)?;
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    mem.write(gpa, &odd.wrapping_add(1).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::frame::FrameAllocator;

    #[test]
    fn record_layout_and_version() {
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let info = TimeInfo::for_vm(1_000, 2_000_000_000, true).unwrap();
        write(&mem, 0x2000, &info).unwrap();
        let mut b = [0u8; 32];
        mem.read(0x2000, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 2, "even after one update");
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 1_000);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), info.mul);
        assert_eq!(b[28] as i8, info.shift);
        assert_eq!(b[29], pvclock::TSC_STABLE);
        write(&mem, 0x2000, &info).unwrap();
        assert_eq!(mem.read_u64(0x2000).unwrap() & 0xFFFF_FFFF, 4);
        // 2 GHz: 2e9 ticks after the start are one second.
        assert!(info.ns_at(1_000 + 2_000_000_000).abs_diff(1_000_000_000) < 10);
    }

    #[test]
    fn wall_clock() {
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        write_wall_clock(&mem, 0x3000, 1_700_000_000_123_456_789).unwrap();
        let mut b = [0u8; 12];
        mem.read(0x3000, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1_700_000_000);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 123_456_789);
    }
}
