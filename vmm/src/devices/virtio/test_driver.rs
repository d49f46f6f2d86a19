//! A simulated virtio driver for unit tests: it lays out split virtqueues in real guest memory,
//! posts descriptor chains and reads the used rings, as a guest's driver would.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const QSIZE: u16 = 16;

pub struct TestQueue {
    pub queue: Queue,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: Wrapping<u16>,
    used_seen: Wrapping<u16>,
}

pub struct TestDriver {
    pub mem: GuestMemoryMmap,
    /// Data buffers are carved from here upwards.
    next_buf: u64,
}

impl TestDriver {
    pub fn new() -> TestDriver {
        TestDriver::with_memory(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("guest memory"))
    }

    /// A driver on `mem`, which must map at least 64 MiB from address 0.
    pub fn with_memory(mem: GuestMemoryMmap) -> TestDriver {
        TestDriver { mem, next_buf: 1 << 20 }
    }

    /// A queue whose rings live at `base` (16 KiB is plenty for QSIZE entries).
    pub fn queue(&self, base: u64) -> TestQueue {
        let desc = GuestAddress(base);
        let avail = GuestAddress(base + 0x1000);
        let used = GuestAddress(base + 0x2000);
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(desc.0 as u32), Some((desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(avail.0 as u32), Some((avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        TestQueue { queue: q, desc, avail, used, next_desc: 0, avail_idx: Wrapping(0), used_seen: Wrapping(0) }
    }

    /// A fresh buffer in guest memory holding `bytes` (or zeros of `len`).
    pub fn buffer(&mut self, bytes: &[u8], len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf += u64::from(len.max(bytes.len() as u32)).next_multiple_of(64);
        assert!(self.next_buf < 64 << 20, "test driver out of buffer memory");
        self.mem.write_slice(bytes, GuestAddress(addr)).expect("write buffer");
        addr
    }

    /// Posts a chain of (address, length, device-writable) descriptors; returns its head.
    pub fn post(&self, q: &mut TestQueue, descs: &[(u64, u32, bool)]) -> u16 {
        let head = q.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            // The descriptor's flags field is 16 bits; virtio_bindings' flags are u32.
            let flags = (if write { VRING_DESC_F_WRITE } else { 0 } | if last { 0 } else { VRING_DESC_F_NEXT }) as u16;
            let next = (idx + 1) % QSIZE;
            let d = q.desc.unchecked_add(u64::from(idx) * 16);
            self.mem.write_obj(addr.to_le(), d).unwrap();
            self.mem.write_obj(len.to_le(), d.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags.to_le(), d.unchecked_add(12)).unwrap();
            self.mem.write_obj(next.to_le(), d.unchecked_add(14)).unwrap();
        }
        q.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = q.avail.unchecked_add(4 + u64::from(q.avail_idx.0 % QSIZE) * 2);
        self.mem.write_obj(head.to_le(), slot).unwrap();
        q.avail_idx += Wrapping(1);
        std::sync::atomic::fence(Ordering::Release);
        self.mem.write_obj(q.avail_idx.0.to_le(), q.avail.unchecked_add(2)).unwrap();
        head
    }

    /// Writes a raw descriptor (for hostile-chain tests).
    pub fn raw_desc(&self, q: &TestQueue, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = q.desc.unchecked_add(u64::from(idx) * 16);
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }

    /// Makes descriptor `head` available without touching the table.
    pub fn make_available(&self, q: &mut TestQueue, head: u16) {
        let slot = q.avail.unchecked_add(4 + u64::from(q.avail_idx.0 % QSIZE) * 2);
        self.mem.write_obj(head, slot).unwrap();
        q.avail_idx += Wrapping(1);
        self.mem.write_obj(q.avail_idx.0, q.avail.unchecked_add(2)).unwrap();
    }

    /// New used-ring entries: (head, length written).
    pub fn take_used(&self, q: &mut TestQueue) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(q.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while q.used_seen.0 != idx {
            let e = q.used.unchecked_add(4 + u64::from(q.used_seen.0 % QSIZE) * 8);
            let id: u32 = self.mem.read_obj(e).unwrap();
            let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            q.used_seen += Wrapping(1);
        }
        out
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
