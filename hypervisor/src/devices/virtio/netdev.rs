//! The virtio-net device (virtio 1.2 §5.1, device type 1) and the virtual switches between
//! VMs' NICs: a VM line with `net=SWITCH` gets one NIC at 00:03.0 (`devices::pc`), port of the
//! Vireo-wide switch named SWITCH (created on first use, [`switch_named`]).
//!
//! Queues (§5.1.2): 0 is receiveq1, 1 is transmitq1; no control queue, one pair. The frame
//! format is [`super::net`]'s (12-byte `virtio_net_hdr`, no offloads, no mergeable buffers).
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
//! Copies: sender RAM -> inbox frame -> receiver RAM (two; one per flooded destination).
//!
//! Nothing a guest writes can make Vireo panic: a malformed transmit chain (runt, giant,
//! offload header) is dropped and counted; a ring error is the transport's "needs reset".

use alloc::{boxed::Box, collections::VecDeque, string::String, sync::Arc, vec::Vec};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Mutex;

use super::{
    net::{self, NetStats, MAX_FRAME, RX_QUEUE, TX_QUEUE},
    queue::QueueError,
    Queues, VirtioDevice, TYPE_NET,
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

/// One NIC's side of a switch: where frames for it wait, and how its VM is woken.
pub struct Port {
    inbox: Mutex<VecDeque<Vec<u8>>>,
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
            inbox: Mutex::new(VecDeque::new()),
            wake: AtomicBool::new(false),
            up: AtomicBool::new(false),
            irq,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a copy of `frame`; wakes the VM. Runs on the sender's host CPU.
    fn deliver(&self, frame: &[u8]) {
        if !self.up.load(Ordering::Acquire) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        {
            let mut inbox = self.inbox.lock();
            if inbox.len() >= BACKLOG {
                drop(inbox);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            inbox.push_back(frame.to_vec());
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
    /// unicast address), found under the switch lock and filled after it is let go.
    fn send(&self, from: PortId, frame: &[u8], now_ns: u64) {
        let mut targets: [Option<Arc<Port>>; 8] = Default::default();
        let mut more: Vec<Arc<Port>> = Vec::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            match st.switch.forward(from, frame, now_ns) {
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
        for port in targets.iter().flatten().chain(more.iter()) {
            port.deliver(frame);
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
    frame: Box<[u8; MAX_FRAME]>,
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
            frame: Box::new([0; MAX_FRAME]),
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
                match net::take_tx(&chain, queues.mem(), &mut self.frame)? {
                    Ok(len) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += len as u64;
                        self.switch.send(self.id, &self.frame[..len], (self.clock)());
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

    /// Moves frames from the inbox into receive chains while both last.
    fn receive(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        let q = RX_QUEUE as u16;
        self.port.wake.store(false, Ordering::Release);
        loop {
            let Some(frame) = self.port.inbox.lock().pop_front() else { return Ok(()) };
            let Some(chain) = queues.pop(q)? else {
                // No buffer: the frame waits for the driver's next kick on queue 0.
                self.port.inbox.lock().push_front(frame);
                return Ok(());
            };
            match net::put_rx(&chain, queues.mem(), &frame)? {
                Some(used) => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += frame.len() as u64;
                    queues.push_used(q, chain.head, used)?;
                }
                None => {
                    self.stats.rx_dropped += 1;
                    queues.push_used(q, chain.head, 0)?;
                }
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
        net::features()
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

    fn activate(&mut self, _features: u64) {
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
        self.port.inbox.lock().clear();
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
            "net switch={} port={} vm={} tx_frames={} tx_bytes={} tx_dropped={} rx_frames={} rx_bytes={} rx_dropped={} backlog_dropped={} switch_in={} switch_dropped={}",
            self.switch.name,
            self.id,
            self.vm,
            s.tx_frames,
            s.tx_bytes,
            s.tx_dropped,
            s.rx_frames,
            s.rx_bytes,
            s.rx_dropped,
            self.backlog_dropped(),
            sw.rx_frames,
            sw.rx_dropped
        );
    }
}
