//! The virtio-net device (virtio 1.2 §5.1, device type 1) and the virtual switches between
//! VMs' NICs: a VM line with `net=SWITCH` gets one NIC at 00:03.0 (`devices::pc`), port of the
//! Vireo-wide switch named SWITCH (created on first use, [`switch_named`]).
//!
//! Queues (§5.1.2): 0 is receiveq1, 1 is transmitq1; no control queue, one pair. Frames carry
//! the 12-byte `virtio_net_hdr` (§5.1.6) and no mergeable buffers; beyond [`super::net`]'s
//! MAC, STATUS and MTU the checksum and TCP segmentation offloads are offered, and the header
//! travels with the frame to the receiver ([`offload_features`]).
//!
//! Receive chains are posted to the port (on the receiver's own vCPU, when its driver kicks
//! queue 0 or its device work runs): the device takes every chain the driver made available,
//! resolves its writable buffers to host addresses ([`Posted`]; lazy RAM is populated then)
//! and hands them to its switch port.
//!
//! Transmit (a kick on queue 1, on the sender's host CPU): with kicks disabled (§2.7.10) the
//! device takes every available chain, copies and checks its head (the `virtio_net_hdr` and the
//! Ethernet header: [`take_tx_offload`]), asks the learning switch ([`Switch::forward_head`])
//! where it goes, and for each destination port copies the frame **once**, from the sender's
//! RAM straight into the oldest chain that port's VM posted ([`Frame::fill`], under the port's
//! lock); only then does the transmit chain go back to the sender's driver. Then it re-enables
//! kicks and looks again (the race of §2.7.10's "check after enabling"). The destination VM is
//! woken with [`Interrupts::wake_devices`] (an atomic flag and a kick of its vCPU 0's host
//! CPU); on its own vCPU it returns the filled chains to its driver, in the order the frames
//! came, and the transport raises the used-buffer interrupt if the driver wants one
//! (EVENT_IDX, §2.7.10).
//!
//! Locks: a sender holds its own VM's device lock and, one at a time, the switch's lock and a
//! destination port's lock; the port's and switch's locks are leaves (nothing is taken under
//! them). No host CPU ever holds two VMs' device locks, so two VMs sending to each other cannot
//! deadlock.
//!
//! The backlog: a frame that arrives while the receiver has no chain posted (or while older
//! frames still wait) is copied into a buffer of its own and waits in the port's bounded
//! backlog ([`BACKLOG`] frames, [`BACKLOG_BYTES`]) instead of being dropped (a drop costs TCP
//! a retransmission timeout and collapses its window); the receiver moves it into its next
//! chain (its second copy). A full backlog drops (counted), so a guest that never posts
//! buffers costs Vireo at most that much memory. The port line at the VM's end counts both
//! paths (`rx_direct`, `rx_backlogged`).
//!
//! Posted chains' host addresses are used only under the port's lock and withdrawn under it
//! when the NIC resets or its VM ends, before the VM's RAM is given back (`Vm::into_memory`).
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

/// Bytes of a frame that the switch and the receiver look at, copied and checked at transmit:
/// the `virtio_net_hdr` and the Ethernet header.
pub const HEAD_LEN: usize = HEADER_LEN + crate::devices::switch::ETH_HEADER_LEN;

/// A transmitted frame on its way through the switch: its head as checked (a guest changing
/// its memory meanwhile cannot change where the frame goes or what offloads it asks for),
/// the rest still in the sender's RAM, copied from there once per receiver
/// ([`Frame::fill`]: straight into the receiver's buffer).
pub struct Frame<'a> {
    head: [u8; HEAD_LEN],
    len: usize,
    chain: &'a Chain,
    mem: &'a dyn GuestRam,
}

impl Frame<'_> {
    /// Header and frame length in bytes (never 0: a frame has at least its head).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The Ethernet frame's first bytes (destination and source MAC, type).
    pub fn eth(&self) -> &[u8] {
        &self.head[HEADER_LEN..]
    }

    /// The frame in a buffer of its own (for a backlog), `num_buffers` set.
    fn to_vec(&self) -> Result<Vec<u8>, QueueError> {
        let mut buf = alloc::vec![0u8; self.len];
        buf[..HEAD_LEN].copy_from_slice(&self.head);
        stream::read(self.chain, self.mem, HEAD_LEN as u64, &mut buf[HEAD_LEN..])?;
        set_num_buffers(&mut buf);
        Ok(buf)
    }

    /// Copies the frame into posted receive chain `p` (at least `len` bytes long): the head
    /// from the checked copy, the rest straight from the sender's RAM.
    fn fill(&self, p: &Posted) -> Result<(), QueueError> {
        let mut head = self.head;
        set_num_buffers(&mut head);
        p.write(0, &head);
        p.walk(HEAD_LEN, self.len - HEAD_LEN, |dst, r| {
            // SAFETY: `dst` is a piece of a posted chain, valid for `r.len()` bytes while the
            // port's lock is held (the caller holds it; `Posted`).
            let n = unsafe { stream::read_to(self.chain, self.mem, r.start as u64, dst, r.len()) }?;
            if n == r.len() {
                Ok(())
            } else {
                Err(QueueError::Memory)
            }
        })
    }
}

/// `num_buffers` (le16 at offset 10) is 1 without VIRTIO_NET_F_MRG_RXBUF (§5.1.6.3.1).
fn set_num_buffers(head: &mut [u8]) {
    head[10..12].copy_from_slice(&1u16.to_le_bytes());
}

/// Checks transmit chain `chain` against the driver's negotiated `features` and copies its
/// head; the frame's bytes stay in the sender's RAM until a receiver takes them.
pub fn take_tx_offload<'a>(
    chain: &'a Chain,
    mem: &'a dyn GuestRam,
    features: u64,
) -> Result<Result<Frame<'a>, TxCheck>, QueueError> {
    let total = chain.readable_len();
    if total < HEAD_LEN as u64 {
        return Ok(Err(TxCheck::Runt));
    }
    if total - HEADER_LEN as u64 > MAX_GSO_FRAME as u64 {
        return Ok(Err(TxCheck::TooBig));
    }
    let mut head = [0u8; HEAD_LEN];
    stream::read(chain, mem, 0, &mut head)?;
    let has = |bit: u32| features & (1 << bit) != 0;
    let (flags, gso) = (head[0], head[1]);
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
    // DATA_VALID is only for the receive direction; num_buffers is the receiver's.
    head[0] &= !HDR_F_DATA_VALID;
    Ok(Ok(Frame { head, len: total as usize, chain, mem }))
}

/// A receive chain the receiving VM handed to its port for senders to fill: its head and its
/// device-writable buffers as host addresses, in stream order (resolved, and lazy RAM
/// populated, on the receiver's own CPU: [`GuestRam::host_range`]).
///
/// The addresses are used only under the port's lock, and they are withdrawn under that lock
/// before the receiver's RAM can go away: its NIC's reset and drop empty the port, and a VM
/// drops its devices before it gives its RAM back (`Vm::into_memory`).
struct Posted {
    head: u16,
    /// (host address, length) of each writable buffer.
    pieces: Vec<(usize, u32)>,
    len: u64,
}

impl Posted {
    /// `chain`'s writable buffers resolved; `None` if the RAM hands out no addresses.
    fn new(chain: &Chain, mem: &dyn GuestRam) -> Option<Self> {
        let mut pieces = Vec::with_capacity(chain.buffers.len());
        for b in chain.buffers.iter().filter(|b| b.writable && b.len > 0) {
            pieces.push((mem.host_range(b.addr, u64::from(b.len))? as usize, b.len));
        }
        Some(Posted { head: chain.head, pieces, len: chain.writable_len() })
    }

    /// Calls `f(host address, range of the stream)` for each piece of `[offset, offset + len)`.
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(*mut u8, core::ops::Range<usize>) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        let end = offset + len;
        let mut at = 0usize;
        for &(addr, plen) in &self.pieces {
            let plen = plen as usize;
            let (s, e) = (offset.max(at), end.min(at + plen));
            if s < e {
                f((addr + (s - at)) as *mut u8, s..e)?;
            }
            at += plen;
            if at >= end {
                break;
            }
        }
        Ok(())
    }

    /// Copies `data` into the chain at stream offset `offset` (the chain holds it).
    fn write(&self, offset: usize, data: &[u8]) {
        let _ = self.walk(offset, data.len(), |dst, r| {
            // SAFETY: `dst` is valid for `r.len()` bytes while the port's lock is held (see
            // the type); `r` lies within `[offset, offset + data.len())`. Raw copies only:
            // guest RAM is never a Rust reference (`GuestMemory::read`).
            unsafe { core::ptr::copy_nonoverlapping(data[r.start - offset..].as_ptr(), dst, r.len()) };
            Ok(())
        });
    }
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

/// One NIC's side of a switch: the receive chains its VM posted, the chains senders filled,
/// the frames waiting for a chain, and how its VM is woken.
pub struct Port {
    rx: Mutex<PortRx>,
    /// Chains were filled or frames are waiting, and the VM has not looked yet.
    wake: AtomicBool,
    /// The driver is up (DRIVER_OK): frames for a NIC that is down are dropped.
    up: AtomicBool,
    irq: Arc<Interrupts>,
    /// Frames dropped because the backlog was full or the NIC down.
    dropped: AtomicU64,
    /// Frames dropped because their header asks for an offload the receiver did not take.
    offload_dropped: AtomicU64,
    /// Frames copied straight from the sender's RAM into a posted chain (one copy).
    direct: AtomicU64,
    /// Frames that waited in the backlog (copied twice: into the backlog, then into a chain).
    backlogged: AtomicU64,
}

#[derive(Default)]
struct PortRx {
    /// Chains the receiver posted, oldest first.
    posted: VecDeque<Posted>,
    /// (head, bytes written; 0: the chain was too small and the frame dropped) of chains
    /// filled, in the order the frames came: the receiver returns them in this order.
    filled: VecDeque<(u16, u32)>,
    /// Frames (header in front) that came while no chain was posted, oldest first, and their
    /// bytes in all. While it holds any, new frames queue behind them (frames keep their order).
    backlog: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The receiver's negotiated features (what a frame's header may ask of it).
    features: u64,
}

impl Port {
    fn new(irq: Arc<Interrupts>) -> Self {
        Port {
            rx: Mutex::new(PortRx::default()),
            wake: AtomicBool::new(false),
            up: AtomicBool::new(false),
            irq,
            dropped: AtomicU64::new(0),
            offload_dropped: AtomicU64::new(0),
            direct: AtomicU64::new(0),
            backlogged: AtomicU64::new(0),
        }
    }

    /// Hands `frame` to this port's VM, on the sender's host CPU: copied straight into the
    /// oldest posted chain, or else into the bounded backlog; then the VM is woken. An error
    /// reading the sender's RAM is the sender's (its transport's needs-reset).
    fn deliver(&self, frame: &Frame<'_>) -> Result<(), QueueError> {
        if !self.up.load(Ordering::Acquire) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let result = {
            let mut rx = self.rx.lock();
            if !rx_accepts(&frame.head, rx.features) {
                self.offload_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let chain = if rx.backlog.is_empty() { rx.posted.pop_front() } else { None };
            if let Some(p) = chain {
                let r = if p.len < frame.len as u64 { Ok(0) } else { frame.fill(&p).map(|()| frame.len as u32) };
                rx.filled.push_back((p.head, *r.as_ref().unwrap_or(&0)));
                if r.is_ok() {
                    self.direct.fetch_add(1, Ordering::Relaxed);
                }
                r.map(drop)
            } else if rx.backlog.len() >= BACKLOG || rx.bytes + frame.len > BACKLOG_BYTES {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            } else {
                let buf = frame.to_vec()?;
                rx.bytes += buf.len();
                rx.backlog.push_back(buf);
                self.backlogged.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        };
        if !self.wake.swap(true, Ordering::AcqRel) {
            self.irq.wake_devices();
        }
        result
    }

    /// Withdraws everything the receiver handed out or was handed (its NIC resets or leaves).
    fn clear(&self, up: bool) {
        let mut rx = self.rx.lock();
        self.up.store(up, Ordering::Release);
        *rx = PortRx::default();
        self.wake.store(false, Ordering::Release);
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
    /// unicast address) are found under the switch lock and filled after it is let go, each
    /// with one copy out of the sender's RAM.
    fn send(&self, from: PortId, frame: &Frame<'_>, now_ns: u64) -> Result<(), QueueError> {
        let mut targets: [Option<Arc<Port>>; 8] = Default::default();
        let mut more: Vec<Arc<Port>> = Vec::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            match st.switch.forward_head(from, frame.eth(), frame.len - HEADER_LEN, now_ns) {
                Forward::Drop => return Ok(()),
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
        for port in targets.iter().flatten().chain(more.iter()) {
            port.deliver(frame)?;
        }
        Ok(())
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

    /// Frames dropped because their header asked for an offload this NIC did not take.
    pub fn offload_dropped(&self) -> u64 {
        self.port.offload_dropped.load(Ordering::Relaxed)
    }

    /// (frames copied straight into a posted chain, frames that waited in the backlog).
    pub fn rx_paths(&self) -> (u64, u64) {
        (self.port.direct.load(Ordering::Relaxed), self.port.backlogged.load(Ordering::Relaxed))
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
                        // The chain goes back only after every receiver has its copy.
                        self.switch.send(self.id, &frame, (self.clock)())?;
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

    /// Receive work, on this VM's own vCPU: posts the driver's new receive chains to the port
    /// (senders fill them directly), moves frames that waited in the backlog into chains, and
    /// returns the filled chains to the driver in the order their frames came.
    fn receive(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        let q = RX_QUEUE as u16;
        self.port.wake.store(false, Ordering::Release);
        loop {
            // Resolved outside the port's lock (resolving may populate lazy RAM).
            let mut fresh = Vec::new();
            while let Some(chain) = queues.pop(q)? {
                match Posted::new(&chain, queues.mem()) {
                    Some(p) => fresh.push(p),
                    None => queues.push_used(q, chain.head, 0)?,
                }
            }
            let (filled, starved) = {
                let mut rx = self.port.rx.lock();
                rx.posted.extend(fresh);
                // Frames that waited go first, into the oldest chains (their second copy).
                while !rx.backlog.is_empty() && !rx.posted.is_empty() {
                    let (Some(frame), Some(p)) = (rx.backlog.pop_front(), rx.posted.pop_front()) else { break };
                    rx.bytes -= frame.len();
                    let written = if p.len < frame.len() as u64 {
                        0
                    } else {
                        p.write(0, &frame);
                        frame.len() as u32
                    };
                    rx.filled.push_back((p.head, written));
                }
                (core::mem::take(&mut rx.filled), !rx.backlog.is_empty())
            };
            for (head, written) in filled {
                if written == 0 {
                    self.stats.rx_dropped += 1;
                } else {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += u64::from(written) - HEADER_LEN as u64;
                }
                queues.push_used(q, head, written)?;
            }
            // Frames wait and no chain is left: ask for the driver's next kick on queue 0 (with
            // EVENT_IDX: avail_event = the next entry, §2.7.10). While chains are posted the
            // device does not ask, so posting buffers costs no exits.
            if !starved || !queues.enable_notifications(q)? {
                return Ok(());
            }
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
        self.port.rx.lock().features = features;
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
        // The posted chains' addresses are withdrawn: the driver owns its buffers again.
        self.port.clear(false);
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
        // Before the VM's RAM goes: no sender may write into a posted chain from now on.
        self.port.clear(false);
        let sw = self.switch.detach(self.id);
        let s = self.stats;
        crate::report!(
            "net switch={} port={} vm={} tx_frames={} tx_bytes={} tx_dropped={} rx_frames={} rx_bytes={} rx_dropped={} rx_direct={} rx_backlogged={} offload_dropped={} backlog_dropped={} switch_in={} switch_dropped={}",
            self.switch.name,
            self.id,
            self.vm,
            s.tx_frames,
            s.tx_bytes,
            s.tx_dropped,
            s.rx_frames,
            s.rx_bytes,
            s.rx_dropped,
            self.port.direct.load(Ordering::Relaxed),
            self.port.backlogged.load(Ordering::Relaxed),
            self.offload_dropped(),
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
    fn posted_chains_are_filled_straight_from_the_senders_ram_in_order() {
        let mut a = Vm::new("t-direct");
        let mut b = Vm::new("t-direct");
        // b's driver posts three chains and kicks: they go to its port.
        for _ in 0..3 {
            b.post(RX_QUEUE, 2048, &[]);
        }
        b.kick(RX_QUEUE).unwrap();
        assert_eq!(b.nic.port.rx.lock().posted.len(), 3);
        // a's first frame is a broadcast (b is not learned yet), the next two unicast.
        let frames: Vec<Vec<u8>> =
            (0..3).map(|i| tx_bytes(if i == 0 { Mac::BROADCAST } else { b.nic.mac() }, a.nic.mac(), 60 + i)).collect();
        for f in &frames {
            a.post(TX_QUEUE, f.len() as u32, f);
        }
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(b.nic.rx_paths(), (3, 0), "one copy each, no backlog");
        // The bytes are in b's RAM already; the chains go back at b's next look, in order.
        assert_eq!(b.take_used(RX_QUEUE).len(), 0);
        assert_eq!(b.nic.pending_queues(), 1 << RX_QUEUE);
        b.kick(RX_QUEUE).unwrap();
        let got = b.take_used(RX_QUEUE);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        for (g, f) in got.iter().zip(&frames) {
            assert_eq!(g.1 as usize, f.len());
            assert_eq!(&g.2[10..12], &[1, 0], "num_buffers");
            assert_eq!(&g.2[HEADER_LEN..], &f[HEADER_LEN..]);
        }
        // Out of chains: the next two frames wait; a chain posted later takes the older one
        // first, and a frame sent while one still waits queues behind it (order is kept).
        let late: Vec<Vec<u8>> = (0..3).map(|i| tx_bytes(b.nic.mac(), a.nic.mac(), 200 + i)).collect();
        a.post(TX_QUEUE, late[0].len() as u32, &late[0]);
        a.post(TX_QUEUE, late[1].len() as u32, &late[1]);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(b.nic.rx_paths(), (3, 2));
        b.post(RX_QUEUE, 2048, &[]);
        b.kick(RX_QUEUE).unwrap();
        a.post(TX_QUEUE, late[2].len() as u32, &late[2]);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(b.nic.rx_paths(), (3, 3), "behind a waiting frame, the third waits too");
        b.post(RX_QUEUE, 2048, &[]);
        b.post(RX_QUEUE, 2048, &[]);
        b.kick(RX_QUEUE).unwrap();
        let got = b.take_used(RX_QUEUE);
        assert_eq!(got.len(), 3);
        for (g, f) in got.iter().zip(&late) {
            assert_eq!(&g.2[HEADER_LEN..], &f[HEADER_LEN..]);
        }
        assert_eq!(b.nic.stats.rx_frames, 6);
    }

    /// Linux's chains have many buffers: its receive chains without mergeable buffers are a
    /// 12-byte header buffer and pages (§5.1.6.3), its transmit chains a header and fragments.
    #[test]
    fn frames_cross_between_chains_of_many_buffers_at_any_split() {
        use crate::devices::virtio::stream::tests::chain;
        let mem = FlatRam::new(0x10000);
        let mut tx = tx_bytes(Mac::BROADCAST, Mac([2, 0, 0, 0, 0, 1]), 300);
        tx[0] = HDR_F_DATA_VALID; // cleared on the way: receive-side only
        tx[10] = 7; // num_buffers: set to 1 for the receiver
        let mut rng = 0x1234_5678u32;
        for _ in 0..200 {
            // Random splits of the 326 bytes over up to 6 readable buffers at 0x1000.. and of
            // a writable chain over up to 6 buffers at 0x8000.., 326..=400 bytes in all.
            let mut next = |n: u32| {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                rng % n
            };
            let extra = next(75) as usize;
            let mut split = |total: usize, base: u64, writable: bool| {
                let mut bufs = Vec::new();
                let mut left = total;
                let mut i = 0u64;
                while left > 0 {
                    let n = if bufs.len() == 5 { left } else { (next(left as u32) as usize + 1).min(left) };
                    bufs.push((base + i * 0x800, n as u32, writable));
                    left -= n;
                    i += 1;
                }
                bufs
            };
            let txc = chain(&split(tx.len(), 0x1000, false));
            let mut at = 0;
            for b in &txc.buffers {
                mem.write(b.addr, &tx[at..at + b.len as usize]).unwrap();
                at += b.len as usize;
            }
            let rx_len = tx.len() + extra;
            let rxc = chain(&split(rx_len, 0x8000, true));
            let frame = take_tx_offload(&txc, &mem, offload_features()).unwrap().unwrap();
            let posted = Posted::new(&rxc, &mem).unwrap();
            frame.fill(&posted).unwrap();
            let mut got = Vec::new();
            for b in &rxc.buffers {
                let mut piece = vec![0u8; b.len as usize];
                mem.read(b.addr, &mut piece).unwrap();
                got.extend_from_slice(&piece);
            }
            got.truncate(tx.len());
            assert_eq!(got[0], 0, "DATA_VALID cleared");
            assert_eq!(&got[1..10], &tx[1..10]);
            assert_eq!(&got[10..12], &[1, 0]);
            assert_eq!(&got[HEADER_LEN..], &tx[HEADER_LEN..]);
        }
    }

    #[test]
    fn a_reset_or_an_ended_vm_withdraws_its_posted_chains() {
        let mut a = Vm::new("t-withdraw");
        let mut b = Vm::new("t-withdraw");
        b.post(RX_QUEUE, 2048, &[0xEE; 64]);
        b.kick(RX_QUEUE).unwrap();
        b.nic.reset();
        assert!(b.nic.port.rx.lock().posted.is_empty());
        let f = tx_bytes(Mac::BROADCAST, a.nic.mac(), 50);
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(b.nic.rx_paths(), (0, 0));
        assert_eq!(b.nic.backlog_dropped(), 1, "a NIC that is down gets nothing");
        let mut buf = [0u8; 64];
        b.mem.read(BUFS, &mut buf).unwrap();
        assert_eq!(buf, [0xEE; 64], "the withdrawn chain's memory is untouched");
        // A posted chain of a VM that ends is withdrawn with its port.
        let mut c = Vm::new("t-withdraw");
        c.post(RX_QUEUE, 2048, &[]);
        c.kick(RX_QUEUE).unwrap();
        let port = c.nic.port.clone();
        drop(c);
        assert!(port.rx.lock().posted.is_empty());
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert_eq!(port.direct.load(Ordering::Relaxed), 0);
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
        assert_eq!(c.nic.offload_dropped(), 1);
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
        assert!(b.nic.port.rx.lock().backlog.is_empty());
        a.post(TX_QUEUE, f.len() as u32, &f);
        a.kick(TX_QUEUE).unwrap();
        assert!(b.nic.port.rx.lock().backlog.is_empty());
        // b's VM ends: its port leaves the switch.
        let sw = switch_named("t-backlog").unwrap();
        drop(b);
        assert_eq!(sw.state.lock().ports.iter().flatten().count(), 1);
        drop(a);
    }
}
