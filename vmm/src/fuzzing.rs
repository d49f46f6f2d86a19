//! Entry points for fuzzing the parsers a guest controls: the virtqueue descriptor walk, the
//! vsock packet path and the virtio-fs request path. `vmm/fuzz/` (cargo-fuzz) drives them with
//! libFuzzer; the unit tests below run each on a few thousand pseudo-random inputs so that
//! every CI run exercises them too. Each takes arbitrary bytes as guest-written memory: the
//! descriptor table, the available ring and the buffers all come from the input.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use virtio_queue::{Queue, QueueT};

use crate::devices::virtio::{fs::FsDevice, vsock::VsockDevice};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// Guest memory whose first bytes are `data` (rings included) and a queue over it.
fn setup(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).ok()?;
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    // The used ring starts clean; everything else is the input's.
    mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize], GuestAddress(USED)).ok()?;
    let mut q = Queue::new(QSIZE).ok()?;
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    Some((mem, q))
}

/// Walks every chain the input makes available, reading each descriptor's buffer.
pub fn virtqueue_chains(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else { return };
    // The avail index is the input's: at most 2^16 chains, each at most QSIZE long (the
    // crate bounds chain length by the queue size, which is what this checks).
    for _ in 0..(4 * QSIZE) {
        let Some(chain) = q.pop_descriptor_chain(&mem) else { break };
        let mut seen = 0usize;
        for desc in chain {
            seen += 1;
            assert!(seen <= usize::from(QSIZE), "a chain longer than the queue");
            let mut buf = vec![0u8; (desc.len() as usize).min(4096)];
            let _ = mem.read_slice(&mut buf, desc.addr());
        }
    }
}

/// The input as the guest's vsock TX queue; then whatever the device queues for RX.
pub fn vsock_packets(data: &[u8], uds: &std::path::Path) {
    let Some((mem, mut tx)) = setup(data) else { return };
    let Ok(mut dev) = VsockDevice::new(3, uds) else { return };
    dev.process_tx(&mut tx, &mem);
    let Some((_, mut rx)) = setup(data) else { return };
    dev.process_rx(&mut rx, &mem);
}

/// The input as virtio-fs requests on the request queue, served from `dir`.
pub fn fs_requests(data: &[u8], dir: &std::path::Path) {
    let Some((mem, mut q)) = setup(data) else { return };
    let Ok(mut dev) = FsDevice::new(dir, "fuzz") else { return };
    dev.process_queue(&mut q, &mem);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs shaped like real rings: a descriptor table of random entries mostly pointing
    /// into memory, an avail ring naming random heads, random buffer bytes.
    fn inputs(seed: u64, count: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..count).map(move |_| {
            let mut d = vec![0u8; 0x4000];
            for i in 0..usize::from(QSIZE) {
                let r = next();
                let addr = if r % 5 == 0 { next() } else { 0x3000 + (r % 0xc00) };
                let len = if r % 7 == 0 { next() as u32 } else { (r >> 16) as u32 % 512 };
                let flags = (r >> 40) as u16 & 0x7;
                let nxt = (r >> 48) as u16 % (QSIZE + 2);
                d[i * 16..i * 16 + 8].copy_from_slice(&addr.to_le_bytes());
                d[i * 16 + 8..i * 16 + 12].copy_from_slice(&len.to_le_bytes());
                d[i * 16 + 12..i * 16 + 14].copy_from_slice(&flags.to_le_bytes());
                d[i * 16 + 14..i * 16 + 16].copy_from_slice(&nxt.to_le_bytes());
            }
            let avail_idx = (next() % 6) as u16;
            d[0x1002..0x1004].copy_from_slice(&avail_idx.to_le_bytes());
            for i in 0..usize::from(QSIZE) {
                let head = (next() % u64::from(QSIZE + 1)) as u16;
                d[0x1004 + 2 * i..0x1006 + 2 * i].copy_from_slice(&head.to_le_bytes());
            }
            for b in d[0x3000..].iter_mut() {
                *b = next() as u8;
            }
            d
        })
    }

    #[test]
    fn random_rings_do_not_break_the_chain_walk() {
        for input in inputs(0x9e37_79b9_7f4a_7c15, 3000) {
            virtqueue_chains(&input);
        }
        virtqueue_chains(&[]);
        virtqueue_chains(&[0xff; 0x2000]);
    }

    #[test]
    fn random_vsock_packets_are_rejected_or_handled() {
        let dir = tempfile::tempdir().unwrap();
        for (i, input) in inputs(0x2545_f491_4f6c_dd1d, 500).enumerate() {
            vsock_packets(&input, &dir.path().join(format!("v{i}.sock")));
        }
    }

    #[test]
    fn random_fuse_requests_are_rejected_or_answered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"content").unwrap();
        for input in inputs(0xd1b5_4a32_d192_ed03, 500) {
            fs_requests(&input, dir.path());
        }
        assert_eq!(std::fs::read(dir.path().join("file")).unwrap(), b"content");
    }
}
