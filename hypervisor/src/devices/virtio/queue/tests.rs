use super::*;
use core::cell::RefCell;

/// Test RAM: `[0, size)` minus an optional hole, backed by `bytes` at the bottom; reads of RAM
/// above the backing store give zeros and writes there are dropped (so a "large" VM costs
/// nothing).
struct TestRam {
    bytes: RefCell<Vec<u8>>,
    size: u64,
    hole: core::ops::Range<u64>,
}

impl TestRam {
    fn new(backed: usize, size: u64, hole: core::ops::Range<u64>) -> Self {
        TestRam { bytes: RefCell::new(alloc::vec![0; backed]), size, hole }
    }

    fn put(&self, gpa: u64, data: &[u8]) {
        self.write(gpa, data).expect("test writes RAM");
    }

    fn put_u16(&self, gpa: u64, v: u16) {
        self.put(gpa, &v.to_le_bytes());
    }

    fn get_u16(&self, gpa: u64) -> u16 {
        let mut b = [0; 2];
        self.read(gpa, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn get_u32(&self, gpa: u64) -> u32 {
        let mut b = [0; 4];
        self.read(gpa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
}

impl GuestRam for TestRam {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else { return false };
        end <= self.size && (end <= self.hole.start || gpa >= self.hole.end || self.hole.is_empty())
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        if !self.is_ram(gpa, buf.len() as u64) {
            return Err(NotRam);
        }
        let bytes = self.bytes.borrow();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes.get(gpa as usize + i).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        if !self.is_ram(gpa, data.len() as u64) {
            return Err(NotRam);
        }
        let mut bytes = self.bytes.borrow_mut();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(gpa as usize + i) {
                *slot = *b;
            }
        }
        Ok(())
    }
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const DATA: u64 = 0x10000;
const RAM: u64 = 0x40000;
/// A hole (MMIO) in the middle of the test RAM.
const HOLE: core::ops::Range<u64> = 0x20000..0x21000;

fn ram() -> TestRam {
    TestRam::new(RAM as usize, RAM, HOLE)
}

fn config(size: u16) -> QueueConfig {
    QueueConfig { size, desc: DESC, avail: AVAIL, used: USED }
}

fn all_features() -> QueueFeatures {
    QueueFeatures { indirect: true, event_idx: true }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor { addr, len, flags, next }
}

fn set_desc(mem: &TestRam, table: u64, i: u16, d: Descriptor) {
    mem.put(table + 16 * u64::from(i), &d.to_bytes());
}

/// Publishes `heads` in the available ring from entry `first` on, then the index.
fn publish(mem: &TestRam, size: u16, first: u16, heads: &[u16]) {
    for (k, h) in heads.iter().enumerate() {
        let slot = first.wrapping_add(k as u16) % size;
        mem.put_u16(AVAIL + avail::RING + 2 * u64::from(slot), *h);
    }
    mem.put_u16(AVAIL + avail::IDX, first.wrapping_add(heads.len() as u16));
}

/// A queue of `size` with one chain `descs` (indices 0..) published at head 0.
fn one_chain(size: u16, features: QueueFeatures, descs: &[Descriptor]) -> (TestRam, SplitQueue) {
    let mem = ram();
    for (i, d) in descs.iter().enumerate() {
        set_desc(&mem, DESC, i as u16, *d);
    }
    publish(&mem, size, 0, &[0]);
    let q = SplitQueue::new(config(size), features, &mem).unwrap();
    (mem, q)
}

fn pop_err(size: u16, features: QueueFeatures, descs: &[Descriptor]) -> QueueError {
    let (mem, mut q) = one_chain(size, features, descs);
    let e = q.pop(&mem).unwrap_err();
    assert_eq!(q.broken(), Some(e));
    // Sticky: the queue stays broken.
    assert_eq!(q.pop(&mem), Err(e));
    assert_eq!(q.push_used(&mem, 0, 0), Err(e));
    assert_eq!(q.needs_notification(&mem), Err(e));
    e
}

#[test]
fn layouts_match_the_spec() {
    assert_eq!(core::mem::size_of::<Descriptor>(), 16);
    assert_eq!(core::mem::size_of::<UsedElem>(), 8);
    let d = desc(0x1122_3344_5566_7788, 0x99AA_BBCC, 0xDDEE, 0xFF01);
    let b = d.to_bytes();
    assert_eq!(b, [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xCC, 0xBB, 0xAA, 0x99, 0xEE, 0xDD, 0x01, 0xFF]);
    assert_eq!(Descriptor::from_bytes(&b), d);
    // §2.7 sizes: available ring 6 + 2n, used ring 6 + 8n.
    assert_eq!(avail::len(256), 6 + 2 * 256);
    assert_eq!(used::len(256), 6 + 8 * 256);
    assert_eq!((avail::used_event(8), used::avail_event(8)), (20, 68));
    assert_eq!(QueueFeatures::from_bits(1 << 28 | 1 << 29), all_features());
    assert_eq!(QueueFeatures::from_bits(1 << 32), QueueFeatures::default());
}

#[test]
fn new_checks_size_alignment_and_ram() {
    let mem = ram();
    let f = QueueFeatures::default();
    for size in [0u16, 3, 6, 100, 0xFFFF] {
        assert_eq!(SplitQueue::new(config(size), f, &mem).unwrap_err(), QueueError::BadSize(size));
    }
    for size in [1u16, 2, 256, 1024] {
        assert!(SplitQueue::new(config(size), f, &mem).is_ok(), "{size}");
    }
    let c = config(8);
    assert_eq!(
        SplitQueue::new(QueueConfig { desc: DESC + 8, ..c }, f, &mem).unwrap_err(),
        QueueError::Misaligned(Area::Descriptors, DESC + 8)
    );
    assert_eq!(
        SplitQueue::new(QueueConfig { avail: AVAIL + 1, ..c }, f, &mem).unwrap_err(),
        QueueError::Misaligned(Area::Available, AVAIL + 1)
    );
    assert_eq!(
        SplitQueue::new(QueueConfig { used: USED + 2, ..c }, f, &mem).unwrap_err(),
        QueueError::Misaligned(Area::Used, USED + 2)
    );
    // Past the end, straddling the end, in the hole, overflowing.
    for (area, cfg) in [
        (Area::Descriptors, QueueConfig { desc: RAM, ..c }),
        (Area::Descriptors, QueueConfig { desc: RAM - 64, ..c }),
        (Area::Available, QueueConfig { avail: HOLE.start, ..c }),
        (Area::Used, QueueConfig { used: HOLE.start - 8, ..c }),
        (Area::Used, QueueConfig { used: u64::MAX - 3, ..c }),
    ] {
        assert!(matches!(SplitQueue::new(cfg, f, &mem), Err(QueueError::AreaNotInRam(a, _)) if a == area), "{cfg:x?}");
    }
    // A 32768-entry queue needs 512 KiB of descriptors: not in this RAM.
    assert!(matches!(
        SplitQueue::new(config(MAX_QUEUE_SIZE), f, &mem),
        Err(QueueError::AreaNotInRam(Area::Descriptors, _))
    ));
}

#[test]
fn a_chain_round_trip() {
    let (mem, mut q) = one_chain(
        8,
        QueueFeatures::default(),
        &[
            desc(DATA, 0x100, VIRTQ_DESC_F_NEXT, 5),
            desc(0, 0, 0, 0),
            desc(0, 0, 0, 0),
            desc(0, 0, 0, 0),
            desc(0, 0, 0, 0),
            desc(DATA + 0x1000, 0x200, VIRTQ_DESC_F_WRITE, 0),
        ],
    );
    assert_eq!(q.pending(&mem), Ok(1));
    let chain = q.pop(&mem).unwrap().unwrap();
    assert_eq!(chain.head, 0);
    assert_eq!(
        chain.buffers,
        [
            Buffer { addr: DATA, len: 0x100, writable: false },
            Buffer { addr: DATA + 0x1000, len: 0x200, writable: true }
        ]
    );
    assert_eq!((chain.readable_len(), chain.writable_len()), (0x100, 0x200));
    assert_eq!(q.pop(&mem), Ok(None));
    q.push_used(&mem, 0, 0x80).unwrap();
    assert_eq!(mem.get_u16(USED + used::IDX), 1);
    assert_eq!((mem.get_u32(USED + used::RING), mem.get_u32(USED + used::RING + 4)), (0, 0x80));
    // A head is returned once.
    assert_eq!(q.push_used(&mem, 0, 0), Err(QueueError::BadUsedId(0)));
    assert_eq!(q.push_used(&mem, 200, 0), Err(QueueError::BadUsedId(200)));
    assert_eq!(q.broken(), None, "a device bug is not the driver's: the queue goes on");
    // Without event index: notify unless the driver said NO_INTERRUPT.
    assert_eq!(q.needs_notification(&mem), Ok(true));
    mem.put_u16(AVAIL + avail::FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT);
    assert_eq!(q.needs_notification(&mem), Ok(false));
    // Kick suppression through the used ring's flags.
    q.disable_notifications(&mem).unwrap();
    assert_eq!(mem.get_u16(USED + used::FLAGS), VIRTQ_USED_F_NO_NOTIFY);
    assert_eq!(q.enable_notifications(&mem), Ok(false));
    assert_eq!(mem.get_u16(USED + used::FLAGS), 0);
    publish(&mem, 8, 1, &[0]);
    assert_eq!(q.enable_notifications(&mem), Ok(true), "a chain came meanwhile");
}

#[test]
fn indirect_tables() {
    let table = DATA + 0x8000;
    let (mem, mut q) = one_chain(
        8,
        all_features(),
        &[desc(DATA, 0x10, VIRTQ_DESC_F_NEXT, 1), desc(table, 48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0)],
    );
    set_desc(&mem, table, 0, desc(DATA + 0x100, 0x20, VIRTQ_DESC_F_NEXT, 2));
    set_desc(&mem, table, 2, desc(DATA + 0x200, 0x30, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1));
    set_desc(&mem, table, 1, desc(DATA + 0x300, 0x40, VIRTQ_DESC_F_WRITE, 7));
    let chain = q.pop(&mem).unwrap().unwrap();
    let got: Vec<(u64, u32, bool)> = chain.buffers.iter().map(|b| (b.addr, b.len, b.writable)).collect();
    assert_eq!(
        got,
        [(DATA, 0x10, false), (DATA + 0x100, 0x20, false), (DATA + 0x200, 0x30, true), (DATA + 0x300, 0x40, true)]
    );
}

#[test]
fn every_broken_chain_is_an_error() {
    let none = QueueFeatures::default();
    let all = all_features();
    let (n, w, i) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT);
    let ok = |a: u64| desc(a, 0x10, 0, 0);
    let table = DATA + 0x8000;
    let cases: Vec<(&str, QueueFeatures, Vec<Descriptor>, QueueError)> = alloc::vec![
        ("self loop", none, alloc::vec![desc(DATA, 1, n, 0)], QueueError::Loop(0)),
        ("two-step loop", none, alloc::vec![desc(DATA, 1, n, 1), desc(DATA, 1, n, 0)], QueueError::Loop(0)),
        (
            "next past the table",
            none,
            alloc::vec![desc(DATA, 1, n, 8)],
            QueueError::NextOutOfRange { index: 8, table_len: 8 }
        ),
        ("empty buffer", none, alloc::vec![desc(DATA, 0, 0, 0)], QueueError::EmptyBuffer { addr: DATA }),
        ("past RAM", none, alloc::vec![desc(RAM, 1, 0, 0)], QueueError::BufferNotInRam { addr: RAM, len: 1 }),
        (
            "straddling RAM's end",
            none,
            alloc::vec![desc(RAM - 1, 2, 0, 0)],
            QueueError::BufferNotInRam { addr: RAM - 1, len: 2 }
        ),
        (
            "in the hole",
            none,
            alloc::vec![desc(HOLE.start + 4, 4, 0, 0)],
            QueueError::BufferNotInRam { addr: HOLE.start + 4, len: 4 }
        ),
        (
            "into the hole",
            none,
            alloc::vec![desc(HOLE.start - 4, 8, 0, 0)],
            QueueError::BufferNotInRam { addr: HOLE.start - 4, len: 8 }
        ),
        (
            "wrapping",
            none,
            alloc::vec![desc(u64::MAX, 0x10, 0, 0)],
            QueueError::BufferNotInRam { addr: u64::MAX, len: 0x10 }
        ),
        (
            "readable after writable",
            none,
            alloc::vec![desc(DATA, 1, n | w, 1), ok(DATA)],
            QueueError::ReadableAfterWritable
        ),
        ("indirect not negotiated", none, alloc::vec![desc(table, 16, i, 0)], QueueError::IndirectNotNegotiated),
        ("indirect with next", all, alloc::vec![desc(table, 16, i | n, 1), ok(DATA)], QueueError::IndirectWithNext),
        ("indirect of 0 bytes", all, alloc::vec![desc(table, 0, i, 0)], QueueError::BadIndirectLength(0)),
        ("indirect of 17 bytes", all, alloc::vec![desc(table, 17, i, 0)], QueueError::BadIndirectLength(17)),
        (
            "indirect past RAM",
            all,
            alloc::vec![desc(RAM - 16, 32, i, 0)],
            QueueError::BufferNotInRam { addr: RAM - 16, len: 32 }
        ),
        (
            "indirect longer than the queue",
            all,
            alloc::vec![desc(table, 16 * 9, i, 0)],
            QueueError::ChainTooLong { size: 8 }
        ),
    ];
    for (what, f, descs, want) in cases {
        assert_eq!(pop_err(8, f, &descs), want, "{what}");
        assert!(!alloc::format!("{want}").is_empty());
    }

    // Inside indirect tables.
    let indirect_case = |entries: &[Descriptor], direct: &[Descriptor]| {
        let (mem, mut q) = one_chain(8, all, direct);
        for (k, d) in entries.iter().enumerate() {
            set_desc(&mem, table, k as u16, *d);
        }
        q.pop(&mem).unwrap_err()
    };
    let ind = |len: u32| desc(table, len, i, 0);
    assert_eq!(indirect_case(&[desc(table, 16, i, 0)], &[ind(16)]), QueueError::NestedIndirect);
    assert_eq!(indirect_case(&[desc(DATA, 1, n, 1), desc(DATA, 1, n, 0)], &[ind(32)]), QueueError::Loop(0));
    assert_eq!(
        indirect_case(&[desc(DATA, 1, n, 2)], &[ind(32)]),
        QueueError::NextOutOfRange { index: 2, table_len: 2 }
    );
    assert_eq!(indirect_case(&[desc(RAM, 1, 0, 0)], &[ind(16)]), QueueError::BufferNotInRam { addr: RAM, len: 1 });
    // Direct descriptors plus the indirect table's entries exceed the queue size (8).
    let mut entries: Vec<Descriptor> = (0..8).map(|k| desc(DATA, 1, n, k + 1)).collect();
    entries[7].flags = 0;
    let direct = [desc(DATA, 1, n, 1), ind(16 * 8)];
    assert_eq!(indirect_case(&entries, &direct), QueueError::ChainTooLong { size: 8 });
    entries.truncate(7);
    entries[6].flags = 0;
    let direct = [desc(DATA, 1, n, 1), ind(16 * 7)];
    let (mem, mut q) = one_chain(8, all, &direct);
    for (k, d) in entries.iter().enumerate() {
        set_desc(&mem, table, k as u16, *d);
    }
    assert_eq!(q.pop(&mem).unwrap().unwrap().buffers.len(), 8, "exactly the queue size is fine");

    // Head and index errors.
    let mem = ram();
    set_desc(&mem, DESC, 0, ok(DATA));
    publish(&mem, 8, 0, &[8]);
    let mut q = SplitQueue::new(config(8), none, &mem).unwrap();
    assert_eq!(q.pop(&mem), Err(QueueError::HeadOutOfRange(8)));
    // The same head twice while the device holds it.
    let mem = ram();
    set_desc(&mem, DESC, 3, ok(DATA));
    publish(&mem, 8, 0, &[3, 3]);
    let mut q = SplitQueue::new(config(8), none, &mem).unwrap();
    assert_eq!(q.pop(&mem).unwrap().unwrap().head, 3);
    assert_eq!(q.pop(&mem), Err(QueueError::HeadInFlight(3)));
    // Once used, it may come again.
    let mem = ram();
    set_desc(&mem, DESC, 3, ok(DATA));
    publish(&mem, 8, 0, &[3, 3]);
    let mut q = SplitQueue::new(config(8), none, &mem).unwrap();
    let c = q.pop(&mem).unwrap().unwrap();
    q.push_used(&mem, c.head, 0).unwrap();
    assert_eq!(q.pop(&mem).unwrap().unwrap().head, 3);
    let mem = ram();
    mem.put_u16(AVAIL + avail::IDX, 9);
    let mut q = SplitQueue::new(config(8), none, &mem).unwrap();
    assert_eq!(q.pop(&mem), Err(QueueError::AvailIndexJump { avail_idx: 9, next: 0 }));
}

#[test]
fn more_than_4_gib_in_one_chain() {
    let mem = TestRam::new(RAM as usize, 16 << 30, 0..0);
    set_desc(&mem, DESC, 0, desc(1 << 32, 0x8000_0000, VIRTQ_DESC_F_NEXT, 1));
    set_desc(&mem, DESC, 1, desc(2 << 32, 0x8000_0000, VIRTQ_DESC_F_NEXT, 2));
    set_desc(&mem, DESC, 2, desc(3 << 32, 1, 0, 0));
    publish(&mem, 8, 0, &[0]);
    let mut q = SplitQueue::new(config(8), QueueFeatures::default(), &mem).unwrap();
    assert_eq!(q.pop(&mem), Err(QueueError::ChainTooBig));
}

#[test]
fn indices_wrap_at_65536() {
    let mem = ram();
    for k in 0..4 {
        set_desc(&mem, DESC, k, desc(DATA + 0x100 * u64::from(k), 0x10, VIRTQ_DESC_F_WRITE, 0));
    }
    let mut q = SplitQueue::new(config(4), all_features(), &mem).unwrap();
    q.next_avail = 0xFFFE;
    q.next_used = 0xFFFE;
    publish(&mem, 4, 0xFFFE, &[2, 3, 0]);
    assert_eq!(mem.get_u16(AVAIL + avail::IDX), 1);
    assert_eq!(q.pending(&mem), Ok(3));
    let heads: Vec<u16> = core::iter::from_fn(|| q.pop(&mem).unwrap()).map(|c| c.head).collect();
    assert_eq!(heads, [2, 3, 0]);
    for h in heads {
        q.push_used(&mem, h, 1).unwrap();
    }
    assert_eq!(mem.get_u16(USED + used::IDX), 1);
    // Entry 0xFFFF % 4 = 3 holds the second chain.
    assert_eq!(mem.get_u32(USED + used::RING + 8 * 3), 3);
}

#[test]
fn event_index_suppression() {
    // vring_need_event: notify iff used_event lies in [old, new).
    assert!(need_event(0, 1, 0));
    assert!(!need_event(1, 1, 0));
    assert!(need_event(5, 10, 3));
    assert!(!need_event(10, 10, 3));
    assert!(need_event(0xFFFF, 2, 0xFFFE), "across the wrap");
    assert!(!need_event(3, 2, 0xFFFE));

    let mem = ram();
    for k in 0..8 {
        set_desc(&mem, DESC, k, desc(DATA, 0x10, VIRTQ_DESC_F_WRITE, 0));
    }
    let mut q = SplitQueue::new(config(8), all_features(), &mem).unwrap();
    publish(&mem, 8, 0, &[0, 1, 2, 3, 4]);
    let used_event = AVAIL + avail::used_event(8);
    // The driver asks for an interrupt when the used index passes 2 (i.e. reaches 3).
    mem.put_u16(used_event, 2);
    mem.put_u16(AVAIL + avail::FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT); // ignored with EVENT_IDX
    let mut notified = Vec::new();
    for _ in 0..5 {
        let c = q.pop(&mem).unwrap().unwrap();
        q.push_used(&mem, c.head, 0).unwrap();
        notified.push(q.needs_notification(&mem).unwrap());
    }
    // The first decision is always made; then only when crossing used_event (2 -> 3).
    assert_eq!(notified, [true, false, true, false, false]);
    // Kicks: avail_event is the next entry the device takes.
    q.disable_notifications(&mem).unwrap();
    assert_eq!(mem.get_u16(USED + used::FLAGS), 0, "no flag with EVENT_IDX");
    assert_eq!(q.enable_notifications(&mem), Ok(false));
    assert_eq!(mem.get_u16(USED + used::avail_event(8)), 5);
}

/// xorshift64*: a small deterministic generator for the fuzz test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// A guest address: mostly in RAM, sometimes near its end, in or next to the hole, or wild.
fn fuzz_addr(rng: &mut Rng) -> u64 {
    match rng.below(24) {
        0 => RAM - rng.below(64),
        1 => HOLE.start - rng.below(32) + rng.below(64),
        2 => rng.next(),
        3 => u64::MAX - rng.below(64),
        _ => DATA + rng.below(RAM - DATA),
    }
}

fn fuzz_len(rng: &mut Rng) -> u32 {
    match rng.below(24) {
        0 => 0,
        1 => rng.next() as u32,
        2 => 16 * rng.below(20) as u32 + rng.below(2) as u32,
        _ => 1 + rng.below(0x800) as u32,
    }
}

/// Random descriptor tables, indirect tables, rings and indices, thousands of times: the queue
/// never panics, and every chain it accepts has at most `size` buffers, all non-empty, in RAM
/// (outside the hole), readable ones first, at most 4 GiB in all.
#[test]
fn fuzz_random_queues_never_panic_and_accepted_chains_are_sound() {
    let mut rng = Rng(0x5EED_0F71_517E_5700);
    let mut accepted = 0u64;
    let mut rejected = 0u64;
    let mut indirect_accepted = 0u64;
    for _ in 0..20000 {
        let mem = ram();
        let size = 1u16 << rng.below(9); // 1..=256
        let features = QueueFeatures { indirect: !rng.chance(4), event_idx: rng.chance(2) };
        // Descriptor table: random entries, biased towards plausible ones.
        for k in 0..size {
            let mut flags = 0;
            if rng.chance(2) {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            if rng.chance(3) {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            if rng.chance(6) {
                flags |= VIRTQ_DESC_F_INDIRECT;
            }
            if rng.chance(20) {
                flags = rng.next() as u16;
            }
            let next = if rng.chance(8) { rng.next() as u16 } else { rng.below(u64::from(size)) as u16 };
            let (addr, len) = if flags & VIRTQ_DESC_F_INDIRECT != 0 && !rng.chance(4) {
                (DATA + 0x8000 + 0x800 * rng.below(4), 16 * (1 + rng.below(u64::from(size) + 2)) as u32)
            } else {
                (fuzz_addr(&mut rng), fuzz_len(&mut rng))
            };
            set_desc(&mem, DESC, k, desc(addr, len, flags, next));
        }
        // Four candidate indirect tables.
        for t in 0..4u64 {
            let n = 1 + rng.below(32);
            for k in 0..n {
                let mut flags = rng.below(8) as u16;
                if rng.chance(4) {
                    flags &= !VIRTQ_DESC_F_INDIRECT;
                }
                let next = if rng.chance(3) { (k + 1) as u16 } else { rng.below(40) as u16 };
                let d = desc(fuzz_addr(&mut rng), fuzz_len(&mut rng), flags, next);
                set_desc(&mem, DATA + 0x8000 + 0x800 * t, k as u16, d);
            }
        }
        // Available ring: random heads, a random index (sometimes a jump), random event fields.
        for k in 0..size {
            let head = if rng.chance(10) { rng.next() as u16 } else { rng.below(u64::from(size)) as u16 };
            mem.put_u16(AVAIL + avail::RING + 2 * u64::from(k), head);
        }
        let avail_idx = if rng.chance(10) { rng.next() as u16 } else { rng.below(u64::from(size) + 1) as u16 };
        mem.put_u16(AVAIL + avail::IDX, avail_idx);
        mem.put_u16(AVAIL + avail::FLAGS, rng.next() as u16);
        mem.put_u16(AVAIL + avail::used_event(size), rng.next() as u16);

        let Ok(mut q) = SplitQueue::new(config(size), features, &mem) else { continue };
        for _ in 0..(u32::from(size) + 2) {
            match q.pop(&mem) {
                Ok(Some(chain)) => {
                    accepted += 1;
                    assert!(chain.head < size);
                    assert!(!chain.buffers.is_empty() && chain.buffers.len() <= usize::from(size), "{chain:?}");
                    let mut seen_writable = false;
                    let mut total = 0u64;
                    for b in &chain.buffers {
                        assert!(b.len > 0);
                        let end = b.addr.checked_add(u64::from(b.len)).expect("no wrap");
                        assert!(end <= RAM, "{b:x?} past RAM");
                        assert!(end <= HOLE.start || b.addr >= HOLE.end, "{b:x?} in the hole");
                        assert!(!seen_writable || b.writable, "readable after writable");
                        seen_writable |= b.writable;
                        total += u64::from(b.len);
                    }
                    assert!(total <= 1 << 32);
                    let mut d = [0; 16];
                    mem.read(DESC + 16 * u64::from(chain.head), &mut d).unwrap();
                    if Descriptor::from_bytes(&d).flags & VIRTQ_DESC_F_INDIRECT != 0 {
                        indirect_accepted += 1;
                    }
                    // Return most chains, with any length; sometimes keep them.
                    if !rng.chance(4) {
                        q.push_used(&mem, chain.head, rng.next() as u32).unwrap();
                    }
                    let _ = q.needs_notification(&mem).unwrap();
                    if rng.chance(3) {
                        let _ = q.enable_notifications(&mem).unwrap();
                    } else {
                        q.disable_notifications(&mem).unwrap();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    rejected += 1;
                    assert_eq!(q.broken(), Some(e));
                    assert_eq!(q.pop(&mem), Err(e), "sticky");
                    let _ = alloc::format!("{e}");
                    break;
                }
            }
        }
        // Whatever happened, stray calls are harmless.
        let _ = q.push_used(&mem, rng.next() as u16, 0);
        let _ = q.needs_notification(&mem);
    }
    // The generator reaches both sides, indirect tables included.
    std::println!("fuzz: accepted={accepted} rejected={rejected} indirect_accepted={indirect_accepted}");
    assert!(accepted > 5000 && rejected > 5000 && indirect_accepted > 200, "{accepted} {rejected} {indirect_accepted}");
}
