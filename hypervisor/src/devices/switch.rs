//! A learning Ethernet switch between VMs' network devices (IEEE 802.1D transparent bridging,
//! reduced to what a virtual switch needs): the forwarding decision only, so it is tested on
//! the host; the virtio-net devices carry frames in and out.
//!
//! - Learning: a frame's source address, if unicast, is recorded against the port it came in
//!   on (moving it if it was seen elsewhere: a VM that was restarted on another port).
//! - Forwarding: a group (multicast or broadcast) destination, or a unicast one not in the
//!   table, floods to every other port; a known unicast goes to its port, or nowhere if that is
//!   the port it came from (802.1D: a frame is never sent back out of its receiving port).
//! - The table is bounded ([`TABLE_SIZE`]): a guest that sends from endless forged source
//!   addresses evicts the least recently seen entries, it cannot grow Vireo's memory; entries
//!   not seen for [`AGEING_NS`] are forgotten (802.1D's default ageing time, 300 s).
//! - Frames shorter than an Ethernet header are dropped and counted.

use alloc::vec::Vec;

/// An index naming one of the switch's ports.
pub type PortId = usize;

pub const ETH_HEADER_LEN: usize = 14;
/// How many addresses the table holds.
pub const TABLE_SIZE: usize = 1024;
/// 802.1D-2004 §7.9.2: default ageing time 300 s.
pub const AGEING_NS: u64 = 300_000_000_000;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xFF; 6]);

    /// The I/G bit: a group (multicast or broadcast) address.
    pub fn is_group(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The locally administered address Vireo gives VM `vm`'s NIC `nic`: 52:54:00 is QEMU's
    /// prefix and would collide with QEMU-made NICs on a bridged host, so Vireo uses its own
    /// locally administered prefix 0a:56:52 ("\nVR": bit 1 of the first byte set, bit 0 clear).
    pub fn for_vm(vm: u16, nic: u8) -> Mac {
        let [hi, lo] = vm.to_be_bytes();
        Mac([0x0A, 0x56, 0x52, hi, lo, nic])
    }
}

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// To one port.
    Port(PortId),
    /// To every attached port but the one it came in on.
    Flood,
    /// Nowhere (too short, from a detached port, or its destination is where it came from).
    Drop,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    mac: Mac,
    port: PortId,
    last_seen: u64,
}

/// Per-port counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames that came in on the port.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped on the way in (runts, or the port is detached).
    pub rx_dropped: u64,
}

/// The switch's state: attached ports and the address table.
#[derive(Clone, Debug, Default)]
pub struct Switch {
    attached: Vec<bool>,
    stats: Vec<PortStats>,
    table: Vec<Entry>,
}

impl Switch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches a new port and returns its id (ids of detached ports are reused).
    pub fn attach(&mut self) -> PortId {
        if let Some(p) = self.attached.iter().position(|a| !a) {
            self.attached[p] = true;
            self.stats[p] = PortStats::default();
            return p;
        }
        self.attached.push(true);
        self.stats.push(PortStats::default());
        self.attached.len() - 1
    }

    /// Detaches `port` (its VM stopped): its addresses are forgotten.
    pub fn detach(&mut self, port: PortId) {
        if let Some(a) = self.attached.get_mut(port) {
            *a = false;
        }
        self.table.retain(|e| e.port != port);
    }

    /// The attached ports other than `except`: the destinations of a flood.
    pub fn flood_ports(&self, except: PortId) -> impl Iterator<Item = PortId> + '_ {
        self.attached.iter().enumerate().filter(move |&(p, &a)| a && p != except).map(|(p, _)| p)
    }

    pub fn stats(&self, port: PortId) -> PortStats {
        self.stats.get(port).copied().unwrap_or_default()
    }

    /// The port `mac` was last seen on.
    pub fn lookup(&self, mac: Mac) -> Option<PortId> {
        self.table.iter().find(|e| e.mac == mac).map(|e| e.port)
    }

    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Learns from `frame` (which came in on `port` at time `now_ns`) and says where it goes.
    pub fn forward(&mut self, port: PortId, frame: &[u8], now_ns: u64) -> Forward {
        self.forward_head(port, frame, frame.len(), now_ns)
    }

    /// [`Switch::forward`] for a frame of `len` bytes of which only the start, `head`, is at
    /// hand (the rest is still in the sender's RAM).
    pub fn forward_head(&mut self, port: PortId, head: &[u8], len: usize, now_ns: u64) -> Forward {
        if !self.attached.get(port).copied().unwrap_or(false) {
            return Forward::Drop;
        }
        let stats = &mut self.stats[port];
        if head.len() < ETH_HEADER_LEN || len < ETH_HEADER_LEN {
            stats.rx_dropped += 1;
            return Forward::Drop;
        }
        stats.rx_frames += 1;
        stats.rx_bytes += len as u64;
        let frame = head;
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[0..6]);
        src.copy_from_slice(&frame[6..12]);
        let (dst, src) = (Mac(dst), Mac(src));

        self.table.retain(|e| now_ns.saturating_sub(e.last_seen) < AGEING_NS);
        if !src.is_group() {
            self.learn(src, port, now_ns);
        }
        if dst.is_group() {
            return Forward::Flood;
        }
        match self.lookup(dst) {
            Some(p) if p == port => Forward::Drop,
            Some(p) => Forward::Port(p),
            None => Forward::Flood,
        }
    }

    fn learn(&mut self, mac: Mac, port: PortId, now_ns: u64) {
        if let Some(e) = self.table.iter_mut().find(|e| e.mac == mac) {
            e.port = port;
            e.last_seen = now_ns;
            return;
        }
        if self.table.len() >= TABLE_SIZE {
            // Full: the least recently seen address makes room.
            if let Some(oldest) = (0..self.table.len()).min_by_key(|&i| self.table[i].last_seen) {
                self.table.swap_remove(oldest);
            }
        }
        self.table.push(Entry { mac, port, last_seen: now_ns });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f
    }

    #[test]
    fn learns_floods_unknown_and_broadcast_and_forwards_known() {
        let mut sw = Switch::new();
        let (a, b, c) = (sw.attach(), sw.attach(), sw.attach());
        let (ma, mb) = (Mac::for_vm(0, 0), Mac::for_vm(1, 0));
        assert_eq!(sw.forward(a, &frame(Mac::BROADCAST, ma), 0), Forward::Flood);
        assert_eq!(sw.flood_ports(a).collect::<Vec<_>>(), vec![b, c]);
        assert_eq!(sw.forward(a, &frame(mb, ma), 1), Forward::Flood, "b not learned yet");
        assert_eq!(sw.forward(b, &frame(ma, mb), 2), Forward::Port(a));
        assert_eq!(sw.forward(a, &frame(mb, ma), 3), Forward::Port(b));
        assert_eq!(sw.forward(a, &frame(ma, mb), 4), Forward::Drop, "b moved to a: same port");
        assert_eq!(sw.lookup(mb), Some(a));
        let multicast = Mac([0x01, 0x00, 0x5E, 0, 0, 1]);
        assert_eq!(sw.forward(c, &frame(multicast, multicast), 5), Forward::Flood);
        assert_eq!(sw.lookup(multicast), None, "group sources are never learned");
        assert_eq!(sw.stats(a).rx_frames, 4);
    }

    #[test]
    fn runts_and_detached_ports_drop_and_detach_forgets() {
        let mut sw = Switch::new();
        let (a, b) = (sw.attach(), sw.attach());
        assert_eq!(sw.forward(a, &[0u8; 13], 0), Forward::Drop);
        assert_eq!(sw.stats(a).rx_dropped, 1);
        assert_eq!(sw.forward(b, &frame(Mac::BROADCAST, Mac::for_vm(1, 0)), 0), Forward::Flood);
        sw.detach(b);
        assert_eq!(sw.lookup(Mac::for_vm(1, 0)), None);
        assert_eq!(sw.forward(b, &frame(Mac::BROADCAST, Mac::for_vm(1, 0)), 0), Forward::Drop);
        assert_eq!(sw.flood_ports(a).count(), 0);
        assert_eq!(sw.attach(), b, "the id is reused");
        assert_eq!(sw.forward(7, &frame(Mac::BROADCAST, Mac::for_vm(1, 0)), 0), Forward::Drop);
    }

    #[test]
    fn forged_sources_cannot_grow_the_table_and_entries_age_out() {
        let mut sw = Switch::new();
        let (a, b) = (sw.attach(), sw.attach());
        let victim = Mac::for_vm(9, 0);
        sw.forward(b, &frame(Mac::BROADCAST, victim), 0);
        for i in 0..3 * TABLE_SIZE as u32 {
            let [w, x, y, z] = i.to_be_bytes();
            sw.forward(a, &frame(Mac::BROADCAST, Mac([0x02, 0, w, x, y, z])), 1 + u64::from(i));
            assert!(sw.table_len() <= TABLE_SIZE);
        }
        assert_eq!(sw.lookup(victim), None, "the oldest entry was evicted");
        let now = 10 * AGEING_NS;
        sw.forward(b, &frame(Mac::BROADCAST, victim), now);
        assert_eq!(sw.table_len(), 1, "everything else aged out");
    }
}
