//! The virtio-net device (virtio 1.2 §5.1, device type 1) and the virtual switches between
//! VMs' NICs: a VM line with `net=SWITCH` gets one NIC at 00:03.0 (`devices::pc`), port of the
//! Vireo-wide switch named SWITCH (created on first use, [`switch_named`]).
//!
//! Queues (§5.1.2): 0 is receiveq1, 1 is transmitq1; no control queue, one pair. Frames carry
//! the 12-byte `virtio_net_hdr` (§5.1.6) and no mergeable buffers; beyond [`super::net`]'s
//! MAC, STATUS and MTU the checksum and TCP segmentation offloads are offered, and the header
//! travels with the frame to the receiver ([`offload_features`]).
//!
//! Transmit (a kick on queue 1, on the sender's host CPU): with kicks disabled (§2.7.10) the
//! device takes every available chain, copies its frame out of the sender's RAM into a frame
//! buffer, asks the learning switch ([`Switch::forward`]) where it goes, and puts a copy in
//! each destination port's inbox; then it re-enables kicks and looks again (the race of
//! §2.7.10's "check after enabling"). The destination VM is woken with
//! [`Interrupts::wake_devices`] (an atomic flag and a kick of its vCPU 0's host CPU).
//!
//! Receive (on the destination's own vCPU, at its next device tick or when its driver posts
//! buffers with a kick on queue 0): frames leave the inbox into receive chains in the
//! destination's RAM; the transport then raises the used-buffer interrupt if the driver wants
//! one (EVENT_IDX, §2.7.10). Delivery thus runs on the VM that owns the queue, with the VM's own
//! locks: no host CPU ever holds two VMs' device locks, so two VMs sending to each other cannot
//! deadlock. The switch's lock and an inbox's lock are leaves, taken one at a time.
//!
//! The inbox is a bounded backlog ([`BACKLOG`] frames): a frame that arrives while the driver
//! has momentarily no receive buffer posted waits there instead of being dropped (a drop costs
//! TCP a retransmission timeout and collapses its window); a full backlog drops (counted), so a
//! guest that never posts buffers costs Vireo at most `BACKLOG` frames of memory.
//!
//! Copies: sender RAM -> the frame's buffer -> receiver RAM: the buffer moves through the
//! inbox (a flood copies it once more per extra destination). Two memory copies per frame,
//! not one: writing straight into the receiver's chain would need the receiver's queue on the
//! sender's host CPU, with the two VMs' device locks held together (see above).
//!
//! Nothing a guest writes can make Vireo panic: a malformed transmit chain (runt, giant,
//! offload header) is dropped and counted; a ring error is the transport's "needs reset".

use alloc::{collections::VecDeque, string::String, sync::Arc, vec::Vec};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Mutex;

use super::{
    net::{self, NetStats, HEADER_LEN, MAX_FRAME, RX_QUEUE, TX_QUEUE},
    queue::{Chain, GuestRam, QueueError},
    stream, Queues, VirtioDevice, TYPE_NET,
};
use crate::devices::{
    irqchip::Interrupts,
    switch::{Forward, Mac, PortId, Switch},
};

/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// PCI class: network controller, Ethernet (0x0200).
pub const PCI_CLASS: u32 = 0x02_00_00;
/// Frames a port's inbox holds while its driver has no receive buffer.
pub const BACKLOG: usize = 256;
/// Most switches Vireo creates (VM lines name them; each is a few hundred bytes).
pub const MAX_SWITCHES: usize = 16;

/// Offload feature bits (virtio 1.2 §5.1.3): checksums left to the receiver (CSUM: the driver
/// may send partial checksums; GUEST_CSUM: it accepts them) and TCP segmentation left out
/// altogether (HOST_TSO4/6: the driver may send TCP frames of up to 64 KiB; GUEST_TSO4/6: it
/// accepts them). Between two virtio guests on a switch nothing needs segmenting or summing:
/// the header travels with the frame, as a tap device carries it between QEMU guests. A frame
/// whose header asks for more than its receiver negotiated is dropped there (counted as
/// `offload_dropped`).
pub const F_CSUM: u32 = 0;
pub const F_GUEST_CSUM: u32 = 1;
pub const F_GUEST_TSO4: u32 = 7;
pub const F_GUEST_TSO6: u32 = 8;
pub const F_HOST_TSO4: u32 = 11;
pub const F_HOST_TSO6: u32 = 12;
/// `flags` (§5.1.6): VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID.
const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type` (§5.1.6): NONE, TCPV4, TCPV6; the ECN bit.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// The largest TCP segmentation frame: a 64 KiB IP packet plus the Ethernet header and a tag.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Bytes a port's inbox holds at most (frames of up to 64 KiB).
pub const BACKLOG_BYTES: usize = 2 << 20;

/// The offloads offered.
pub fn offload_features() -> u64 {
    [F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6].iter().fold(0, |a, b| a | 1 << b)
}

/// Why a transmit chain is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxCheck {
    Runt,
    TooBig,
    /// The header asks for an offload the driver did not negotiate.
    Offload,
}

/// Reads transmit chain `chain` whole (header and frame: the one copy out of the sender's
/// RAM), checked against the driver's negotiated `features`.
pub fn take_tx_offload(
    chain: &Chain,
    mem: &(impl GuestRam + ?Sized),
    features: u64,
) -> Result<Result<Vec<u8>, TxCheck>, QueueError> {
    let total = chain.readable_len();
    if total < (HEADER_LEN + crate::devices::switch::ETH_HEADER_LEN) as u64 {
        return Ok(Err(TxCheck::Runt));
    }
    if total - HEADER_LEN as u64 > MAX_GSO_FRAME as u64 {
        return Ok(Err(TxCheck::TooBig));
    }
    let mut hdr = [0u8; HEADER_LEN];
    stream::read(chain, mem, 0, &mut hdr)?;
    let has = |bit: u32| features & (1 << bit) != 0;
    let (flags, gso) = (hdr[0], hdr[1]);
    if flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 || (flags & HDR_F_NEEDS_CSUM != 0 && !has(F_CSUM)) {
        return Ok(Err(TxCheck::Offload));
    }
    let gso_ok = match gso & !GSO_ECN {
        GSO_NONE => gso & GSO_ECN == 0,
        GSO_TCPV4 => has(F_HOST_TSO4) && gso & GSO_ECN == 0,
        GSO_TCPV6 => has(F_HOST_TSO6) && gso & GSO_ECN == 0,
        _ => false,
    };
    if !gso_ok {
        return Ok(Err(TxCheck::Offload));
    }
    if gso == GSO_NONE && total - HEADER_LEN as u64 > MAX_FRAME as u64 {
        return Ok(Err(TxCheck::TooBig));
    }
    let mut buf = alloc::vec![0u8; total as usize];
    stream::read(chain, mem, 0, &mut buf)?;
    // The header as checked (the guest may change its memory meanwhile); DATA_VALID is only
    // for the receive direction, num_buffers is the receiver's.
    buf[..HEADER_LEN].copy_from_slice(&hdr);
    buf[0] &= !HDR_F_DATA_VALID;
    Ok(Ok(buf))
}

/// Whether a receiver with negotiated `features` can take a frame with header `hdr`.
pub fn rx_accepts(hdr: &[u8], features: u64) -> bool {
    let has = |bit: u32| features & (1 << bit) != 0;
    let (flags, gso) = (hdr[0], hdr[1]);
    (flags & HDR_F_NEEDS_CSUM == 0 || has(F_GUEST_CSUM))
        && match gso {
            GSO_NONE => true,
            GSO_TCPV4 => has(F_GUEST_TSO4),
            GSO_TCPV6 => has(F_GUEST_TSO6),
            _ => false,
        }
}

/// One NIC's side of a switch: where frames for it wait, and how its VM is woken.
pub struct Port {
    /// Frames with their header in front, and their bytes in all.
    inbox: Mutex<(VecDeque<Vec<u8>>, usize)>,
    /// Frames are waiting and the VM has not looked yet.
    wake: AtomicBool,
    /// The driver is up (DRIVER_OK): frames for a NIC that is down are dropped.
    up: AtomicBool,
    irq: Arc<Interrupts>,
    /// Frames dropped because the inbox was full or the NIC down.
    dropped: AtomicU64,
}

impl Port {
    fn new(irq: Arc<Interrupts>) -> Self {
        Port {
            inbox: Mutex::new((VecDeque::new(), 0)),
            wake: AtomicBool::new(false),
            up: AtomicBool::new(false),
            irq,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `frame`; wakes the VM. Runs on the sender's host CPU.
    fn deliver(&self, frame: Vec<u8>) {
        if !self.up.load(Ordering::Acquire) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        {
            let mut inbox = self.inbox.lock();
            if inbox.0.len() >= BACKLOG || inbox.1 + frame.len() > BACKLOG_BYTES {
                drop(inbox);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            inbox.1 += frame.len();
            inbox.0.push_back(frame);
        }
        if !self.wake.swap(true, Ordering::AcqRel) {
            self.irq.wake_devices();
        }
    }
}

/// A named switch: the forwarding state and the ports' inboxes, under one lock.
pub struct NetSwitch {
    pub name: String,
    state: Mutex<SwitchState>,
}

struct SwitchState {
    switch: Switch,
    ports: Vec<Option<Arc<Port>>>,
}

static SWITCHES: Mutex<Vec<Arc<NetSwitch>>> = Mutex::new(Vec::new());

/// The switch named `name`, created on first use; `None` past [`MAX_SWITCHES`].
pub fn switch_named(name: &str) -> Option<Arc<NetSwitch>> {
    let mut all = SWITCHES.lock();
    if let Some(s) = all.iter().find(|s| s.name == name) {
        return Some(s.clone());
    }
    if all.len() >= MAX_SWITCHES {
        return None;
    }
    let s = Arc::new(NetSwitch {
        name: String::from(name),
        state: Mutex::new(SwitchState { switch: Switch::new(), ports: Vec::new() }),
    });
    all.push(s.clone());
    Some(s)
}

impl NetSwitch {
    /// Attaches a port whose VM is woken through `irq`.
    fn attach(&self, irq: Arc<Interrupts>) -> (PortId, Arc<Port>) {
        let port = Arc::new(Port::new(irq));
        let mut st = self.state.lock();
        let id = st.switch.attach();
        if st.ports.len() <= id {
            st.ports.resize(id + 1, None);
        }
        st.ports[id] = Some(port.clone());
        (id, port)
    }

    fn detach(&self, id: PortId) -> crate::devices::switch::PortStats {
        let mut st = self.state.lock();
        let stats = st.switch.stats(id);
        st.switch.detach(id);
        if let Some(p) = st.ports.get_mut(id) {
            *p = None;
        }
        stats
    }

    /// Forwards `frame` from port `from`: the destinations' ports (at most one for a known
    /// unicast address), found under the switch lock and filled after it is let go. The last
    /// destination gets the buffer itself, the others (a flood) copies.
    fn send(&self, from: PortId, frame: Vec<u8>, now_ns: u64) {
        let mut targets: [Option<Arc<Port>>; 8] = Default::default();
        let mut more: Vec<Arc<Port>> = Vec::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            match st.switch.forward(from, frame.get(HEADER_LEN..).unwrap_or(&[]), now_ns) {
                Forward::Drop => return,
                Forward::Port(p) => targets[0] = st.ports.get(p).cloned().flatten(),
                Forward::Flood => {
                    for (i, p) in st.switch.flood_ports(from).enumerate() {
                        let port = st.ports.get(p).cloned().flatten();
                        match targets.get_mut(i) {
                            Some(slot) => *slot = port,
                            None => more.extend(port),
                        }
                    }
                }
            }
        }
        let mut all = targets.iter().flatten().chain(more.iter()).peekable();
        while let Some(port) = all.next() {
            if all.peek().is_some() {
                port.deliver(frame.clone());
            } else {
                port.deliver(frame);
                return;
            }
        }
    }
}

/// A virtio-net NIC on a switch port.
pub struct VirtioNet {
    vm: String,
    mac: Mac,
    switch: Arc<NetSwitch>,
    id: PortId,
    port: Arc<Port>,
    live: bool,
    /// The features the driver accepted.
    features: u64,
    /// Frames dropped at receive because their offloads were not negotiated here.
    pub offload_dropped: u64,
    /// Guest time source for the switch's ageing (nanoseconds, monotonic).
    clock: fn() -> u64,
    pub stats: NetStats,
}

impl VirtioNet {
    /// VM `vm`'s NIC on `switch`, woken through `irq`; `clock` gives nanoseconds for the
    /// switch's address ageing. Its MAC is [`Mac::for_vm`] of the port number.
    pub fn new(vm: &str, switch: Arc<NetSwitch>, irq: Arc<Interrupts>, clock: fn() -> u64) -> Self {
        let (id, port) = switch.attach(irq);
        let mac = Mac::for_vm(id as u16 + 1, 0);
        VirtioNet {
            vm: String::from(vm),
            mac,
            switch,
            id,
            port,
            live: false,
            features: 0,
            offload_dropped: 0,
            clock,
            stats: NetStats::default(),
        }
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn backlog_dropped(&self) -> u64 {
        self.port.dropped.load(Ordering::Relaxed)
    }

    fn transmit(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        let q = TX_QUEUE as u16;
        queues.disable_notifications(q)?;
        loop {
            while let Some(chain) = queues.pop(q)? {
                match take_tx_offload(&chain, queues.mem(), self.features)? {
                    Ok(frame) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += (frame.len() - HEADER_LEN) as u64;
                        self.switch.send(self.id, frame, (self.clock)());
                    }
                    Err(_) => self.stats.tx_dropped += 1,
                }
                queues.push_used(q, chain.head, 0)?;
            }
            if !queues.enable_notifications(q)? {
                return Ok(());
            }
        }
    }

    fn take_inbox(&self) -> Option<Vec<u8>> {
        let mut inbox = self.port.inbox.lock();
        let f = inbox.0.pop_front()?;
        inbox.1 -= f.len();
        Some(f)
    }

    /// Moves frames from the inbox into receive chains while both last.
    fn receive(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        let q = RX_QUEUE as u16;
        self.port.wake.store(false, Ordering::Release);
        loop {
            let Some(mut frame) = self.take_inbox() else { return Ok(()) };
            if !rx_accepts(&frame, self.features) {
                self.offload_dropped += 1;
                continue;
            }
            let Some(chain) = queues.pop(q)? else {
                // No buffer: the frame waits for the driver's next kick on queue 0, which is
                // asked for now (with EVENT_IDX: avail_event = the next entry, §2.7.10). While
                // frames flow the device does not ask, so posting buffers costs no exits.
                {
                    let mut inbox = self.port.inbox.lock();
                    inbox.1 += frame.len();
                    inbox.0.push_front(frame);
                }
                if queues.enable_notifications(q)? {
                    // Buffers came meanwhile.
                    continue;
                }
                return Ok(());
            };
            if chain.writable_len() < frame.len() as u64 {
                self.stats.rx_dropped += 1;
                queues.push_used(q, chain.head, 0)?;
                continue;
            }
            // num_buffers (le16 at offset 10) is 1 without VIRTIO_NET_F_MRG_RXBUF (§5.1.6.3.1).
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            stream::write(&chain, queues.mem(), 0, &frame)?;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += (frame.len() - HEADER_LEN) as u64;
            queues.push_used(q, chain.head, frame.len() as u32)?;
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn name(&self) -> &'static str {
        "net"
    }

    fn device_type(&self) -> u16 {
        TYPE_NET
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS
    }

    fn features(&self) -> u64 {
        net::features() | offload_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        net::config::LEN as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        net::config_read(self.mac, usize::try_from(offset).unwrap_or(usize::MAX), data);
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
        self.live = true;
        self.port.up.store(true, Ordering::Release);
    }

    fn notify(&mut self, queue: u16, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        match usize::from(queue) {
            TX_QUEUE => {
                self.transmit(queues)?;
                // Frames for this VM may have come in meanwhile: deliver them on the way.
                self.receive(queues)
            }
            RX_QUEUE => self.receive(queues),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.live = false;
        self.port.up.store(false, Ordering::Release);
        *self.port.inbox.lock() = (VecDeque::new(), 0);
        self.port.wake.store(false, Ordering::Release);
    }

    fn pending_queues(&self) -> u64 {
        if self.live && self.port.wake.load(Ordering::Acquire) {
            1 << RX_QUEUE
        } else {
            0
        }
    }
}

impl Drop for VirtioNet {
    /// The VM ended or is being rebuilt after a reset: its port leaves the switch.
    fn drop(&mut self) {
        self.port.up.store(false, Ordering::Release);
        let sw = self.switch.detach(self.id);
        let s = self.stats;
        crate::report!(
            "net switch={} port={} vm={} tx_frames={} tx_bytes={} tx_dropped={} rx_frames={} rx_bytes={} rx_dropped={} offload_dropped={} backlog_dropped={} switch_in={} switch_dropped={}",
            self.switch.name,
            self.id,
            self.vm,
            s.tx_frames,
            s.tx_bytes,
            s.tx_dropped,
            s.rx_frames,
            s.rx_bytes,
            s.rx_dropped,
            self.offload_dropped,
            self.backlog_dropped(),
            sw.rx_frames,
            sw.rx_dropped
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{
        irqchip::no_kick,
        switch::ETH_HEADER_LEN,
        virtio::{
            net::{HEADER_LEN, MAX_FRAME},
            queue::{avail, used, Descriptor, GuestRam, QueueConfig, QueueFeatures, SplitQueue, VIRTQ_DESC_F_WRITE},
            stream::tests::FlatRam,
        },
    };
    use alloc::vec;

    const SIZE: u16 = 8;
    /// (descriptor table, available ring, used ring) of queue q.
    fn layout(q: usize) -> (u64, u64, u64) {
        let base = 0x1000 + 0x3000 * q as u64;
        (base, base + 0x1000, base + 0x2000)
    }
    const BUFS: u64 = 0x8000;

    /// One VM's side: its RAM, queues (rx, tx) as the transport would hold them, its NIC, and
    /// the driver's view (next descriptor and available index per queue).
    struct Vm {
        mem: FlatRam,
        queues: Vec<Option<SplitQueue>>,
        nic: VirtioNet,
        next_avail: [u16; 2],
        used_seen: [u16; 2],
    }

    fn clock() -> u64 {
        0
    }

    impl Vm {
        fn new(switch: &str) -> Self {
            let mem = FlatRam::new(0x40000);
            let irq = Interrupts::new(1, true, 1_000_000_000, no_kick);
            let mut nic = VirtioNet::new("t", switch_named(switch).unwrap(), irq, clock);
            let features = QueueFeatures { indirect: true, event_idx: true };
            let queues = (0..2)
                .map(|q| {
                    let (desc, av, us) = layout(q);
                    Some(
                        SplitQueue::new(QueueConfig { size: SIZE, desc, avail: av, used: us }, features, &mem).unwrap(),
                    )
                })
                .collect();
            nic.activate(0);
            Vm { mem, queues, nic, next_avail: [0; 2], used_seen: [0; 2] }
        }

        /// Makes one one-descriptor chain available on queue q: `len` bytes at a buffer of its
        /// own (device-writable on rx), with `data` at its start.
        fn post(&mut self, q: usize, len: u32, data: &[u8]) {
            let (desc, av, _) = layout(q);
            let slot = self.next_avail[q] % SIZE;
            let addr = BUFS + (q as u64 * SIZE as u64 + slot as u64) * 0x800;
            self.mem.write(addr, data).unwrap();
            let flags = if q == RX_QUEUE { VIRTQ_DESC_F_WRITE } else { 0 };
            let d = Descriptor { addr, len, flags, next: 0 };
            self.mem.write(desc + 16 * u64::from(slot), &d.to_bytes()).unwrap();
            self.mem.write(av + avail::RING + 2 * u64::from(slot), &slot.to_le_bytes()).unwrap();
            self.next_avail[q] = self.next_avail[q].wrapping_add(1);
            self.mem.write(av + avail::IDX, &self.next_avail[q].to_le_bytes()).unwrap();
        }

        fn kick(&mut self, q: usize) -> Result<(), QueueError> {
            let mut queues = Queues::new(&mut self.queues, &self.mem);
            self.nic.notify(q as u16, &mut queues)
        }

        /// The used entries of queue q since the last look: (id, len, the buffer's bytes).
        fn take_used(&mut self, q: usize) -> Vec<(u32, u32, Vec<u8>)> {
            let (desc, _, us) = layout(q);
            let mut b = [0u8; 2];
            self.mem.read(us + used::IDX, &mut b).unwrap();
            let idx = u16::from_le_bytes(b);
            let mut out = Vec::new();
            while self.used_seen[q] != idx {
                let slot = self.used_seen[q] % SIZE;
                let mut e = [0u8; 8];
                self.mem.read(us + used::RING + 8 * u64::from(slot), &mut e).unwrap();
                let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                let mut d = [0u8; 16];
                self.mem.read(desc + 16 * u64::from(id), &mut d).unwrap();
                let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                self.mem.read(addr, &mut data).unwrap();
                out.push((id, len, data));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }
    }

    /// A transmit chain's bytes: a zero header, then a frame from `src` to `dst`.
    fn tx_bytes(dst: Mac, src: Mac, payload: usize) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b.extend_from_slice(&dst.0);
        b.extend_from_slice(&src.0);
        b.extend_from_slice(&[0x08, 0x00]);
        b.extend((0..payload).map(|i| i as u8));
        b
    }

    #[test]
    fn frames_cross_the_switch_into_the_other_vms_receive_buffers() {
        let mut a = Vm::new("t-cross");
        let mut b = Vm::new("t-cross");
        assert_ne!(a.nic.mac(), b.nic.mac());
        b.post(RX_QUEUE, 2048, &[]);
        b.post(RX_QUEUE, 2048, &[]);
        // A broadcast floods to b; b's unicast reply then goes to the port a was learned on.
        let bc = tx_bytes(Mac::BROADCAST, a.nic.mac(), 50);
        a.post(TX_QUEUE, bc.len() as u32, &bc);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(a.take_used(TX_QUEUE).len(), 1, "the tx chain is returned");
        assert_eq!(b.nic.pending_queues(), 1 << RX_QUEUE, "b is woken");
        b.kick(RX_QUEUE).unwrap();
        assert_eq!(b.nic.pending_queues(), 0);
        let got = b.take_used(RX_QUEUE);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1 as usize, bc.len());
        // Header: num_buffers 1; then the frame as sent.
        assert_eq!(&got[0].2[..HEADER_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[0].2[HEADER_LEN..], &bc[HEADER_LEN..]);
        a.post(RX_QUEUE, 2048, &[]);
        let reply = tx_bytes(a.nic.mac(), b.nic.mac(), 100);
        b.post(TX_QUEUE, reply.len() as u32, &reply);
        b.kick(TX_QUEUE).unwrap();
        a.kick(RX_QUEUE).unwrap();
        let got = a.take_used(RX_QUEUE);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].2[HEADER_LEN..], &reply[HEADER_LEN..]);
        assert_eq!((a.nic.stats.tx_frames, a.nic.stats.rx_frames), (1, 1));
        assert_eq!((b.nic.stats.tx_frames, b.nic.stats.rx_frames), (1, 1));
    }

    #[test]
    fn offloaded_frames_keep_their_header_and_reach_only_receivers_that_take_them() {
        let mut a = Vm::new("t-offload");
        let mut b = Vm::new("t-offload");
        let mut c = Vm::new("t-offload");
        let all = offload_features();
        a.nic.activate(all);
        b.nic.activate(all);
        c.nic.activate(0);
        b.post(RX_QUEUE, 0x800, &[]);
        c.post(RX_QUEUE, 0x800, &[]);
        // A TCPv4 segmentation frame with a partial checksum, flooded to b and c.
        let mut f = tx_bytes(Mac::BROADCAST, a.nic.mac(), 1800);
        f[..10].copy_from_slice(&[HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 0xA8, 0x05, 34, 0, 16, 0]);
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(a.nic.stats.tx_frames, 1);
        b.kick(RX_QUEUE).unwrap();
        c.kick(RX_QUEUE).unwrap();
        let got = b.take_used(RX_QUEUE);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].2[..10], &f[..10], "the header as sent");
        assert_eq!(&got[0].2[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[0].2[HEADER_LEN..], &f[HEADER_LEN..]);
        assert_eq!(c.take_used(RX_QUEUE).len(), 0);
        assert_eq!(c.nic.offload_dropped, 1);
        // Without HOST_TSO4 negotiated the same chain is the sender's error: dropped there.
        a.nic.activate(1 << F_CSUM);
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(a.nic.stats.tx_dropped, 1);
        // Unknown flags or GSO types are dropped too.
        a.nic.activate(all);
        f[0] = 0x40;
        a.post(TX_QUEUE, f.len() as u32, &f);
        f[0] = 0;
        f[1] = 3; // UDP (UFO), not offered
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(a.nic.stats.tx_dropped, 3);
    }

    #[test]
    fn hostile_tx_chains_are_dropped_and_contained() {
        let mut a = Vm::new("t-hostile");
        let mut b = Vm::new("t-hostile");
        b.post(RX_QUEUE, 2048, &[]);
        // A runt (header plus half an Ethernet header), a giant, an offload request.
        a.post(TX_QUEUE, (HEADER_LEN + ETH_HEADER_LEN / 2) as u32, &[0; 19]);
        a.post(TX_QUEUE, (HEADER_LEN + MAX_FRAME + 1) as u32, &[0; 12]);
        let mut offload = tx_bytes(Mac::BROADCAST, a.nic.mac(), 50);
        offload[0] = 1;
        a.post(TX_QUEUE, offload.len() as u32, &offload);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(a.take_used(TX_QUEUE).len(), 3, "every chain goes back");
        assert_eq!(a.nic.stats.tx_dropped, 3);
        assert_eq!(a.nic.stats.tx_frames, 0);
        assert_eq!(b.nic.pending_queues(), 0, "nothing reached b");
        // A chain pointing outside RAM is a driver error (the transport's needs-reset), not a
        // panic.
        let (desc, av, _) = layout(TX_QUEUE);
        let slot = a.next_avail[TX_QUEUE] % SIZE;
        let d = Descriptor { addr: 0xFFFF_FFFF_0000, len: 64, flags: 0, next: 0 };
        a.mem.write(desc + 16 * u64::from(slot), &d.to_bytes()).unwrap();
        a.mem.write(av + avail::RING + 2 * u64::from(slot), &slot.to_le_bytes()).unwrap();
        a.mem.write(av + avail::IDX, &a.next_avail[TX_QUEUE].wrapping_add(1).to_le_bytes()).unwrap();
        assert!(a.kick(TX_QUEUE).is_err());
    }

    #[test]
    fn without_receive_buffers_frames_wait_in_a_bounded_backlog() {
        let mut a = Vm::new("t-backlog");
        let mut b = Vm::new("t-backlog");
        let f = tx_bytes(b.nic.mac(), a.nic.mac(), 60);
        // b has posted nothing: the first BACKLOG frames wait, the rest are dropped.
        for _ in 0..(BACKLOG + 5) / SIZE as usize + 1 {
            for _ in 0..SIZE {
                a.post(TX_QUEUE, f.len() as u32, &f);
            }
            a.kick(TX_QUEUE).unwrap();
            a.take_used(TX_QUEUE);
        }
        let sent = ((BACKLOG + 5) / SIZE as usize + 1) * SIZE as usize;
        assert_eq!(a.nic.stats.tx_frames, sent as u64);
        assert_eq!(b.nic.backlog_dropped(), (sent - BACKLOG) as u64);
        b.kick(RX_QUEUE).unwrap();
        assert_eq!(b.take_used(RX_QUEUE).len(), 0);
        // The driver posts buffers, one too small for a frame: that one is returned empty.
        b.post(RX_QUEUE, 20, &[]);
        b.post(RX_QUEUE, 2048, &[]);
        b.kick(RX_QUEUE).unwrap();
        let got = b.take_used(RX_QUEUE);
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), vec![0, f.len() as u32]);
        assert_eq!(b.nic.stats.rx_dropped, 1);
        assert_eq!(b.nic.stats.rx_frames, 1);
        // Starved again with frames waiting, the device asks for a kick at the next buffer
        // (avail_event = 2, the entry after the two it took).
        let (_, _, us) = layout(RX_QUEUE);
        let mut ev = [0u8; 2];
        b.mem.read(us + used::avail_event(SIZE), &mut ev).unwrap();
        assert_eq!(u16::from_le_bytes(ev), 2);
        // A driver reset empties the backlog; a NIC that is down gets nothing.
        b.nic.reset();
        assert!(b.nic.port.inbox.lock().0.is_empty());
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert!(b.nic.port.inbox.lock().0.is_empty());
        // b's VM ends: its port leaves the switch.
        let sw = switch_named("t-backlog").unwrap();
        drop(b);
        assert_eq!(sw.state.lock().ports.iter().flatten().count(), 1);
        drop(a);
    }
}
