//! virtio-balloon with free page reporting only: the guest's page allocator hands the device
//! blocks of memory it has freed (2 MiB and up, a couple of seconds after they were freed),
//! and the device gives their host pages back (MADV_REMOVE on the guest memory file, which
//! every process mapping it sees). A pod's guest touches memory once and keeps it touched
//! otherwise: the initramfs the kernel unpacked and freed, a container's exited process, a
//! page cache dropped. The device never asks the guest to inflate (num_pages stays 0), so it
//! takes nothing the guest did not give up.
//!
//! A hostile guest can only report its own memory: a range outside guest memory, or not
//! page-aligned, is returned untouched and counted; a page it reports and then uses again is
//! a fresh zero page, as after any reclaim.

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use super::device::{read_config_bytes, DeviceEvent, VirtioDevice};

/// virtio 1.2, 5.5.3: the device accepts free page reports on its reporting queue.
pub const F_REPORTING: u64 = 1 << 5;
pub const QUEUE_SIZE: u16 = 32;
/// Queues without the stats or free page hint features: inflate, deflate, reporting.
pub const INFLATE: usize = 0;
pub const DEFLATE: usize = 1;
pub const REPORTING: usize = 2;
const PAGE: u64 = 4096;

#[derive(Default)]
pub struct BalloonDevice {
    /// Bytes of guest memory given back to the host.
    pub reported_bytes: u64,
    /// Reported ranges refused (outside guest memory, unaligned) or that madvise failed on.
    pub rejected: u64,
    /// The driver's `actual` field: pages it says it has in the balloon (always 0 here, as
    /// nothing asks it to inflate; kept so the config space reads back what it wrote).
    actual: u32,
}

impl BalloonDevice {
    /// Serves the reporting queue: each chain lists free blocks of guest memory.
    pub fn process_reports(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for desc in chain {
                match give_back(mem, desc.addr(), u64::from(desc.len())) {
                    Ok(()) => self.reported_bytes += u64::from(desc.len()),
                    Err(why) => {
                        self.rejected += 1;
                        // The guest decides how often this happens: debug only, and counted.
                        tracing::debug!(addr = desc.addr().0, len = desc.len(), why, "virtio-balloon: report refused");
                    }
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::error!(error = %e, "virtio-balloon: cannot return a report");
                return used;
            }
            used = true;
        }
        used
    }

    /// The inflate and deflate queues: never asked for, so whatever a driver posts there is
    /// returned as it came and acted on in no way.
    fn return_unasked(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            if queue.add_used(mem, chain.head_index(), 0).is_err() {
                return used;
            }
            used = true;
        }
        used
    }
}

/// Drops the host pages behind `len` bytes of guest memory at `addr`.
fn give_back(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), &'static str> {
    if len == 0 || addr.0 % PAGE != 0 || len % PAGE != 0 {
        return Err("not whole pages");
    }
    // Every byte must be guest memory before any is dropped: the slices are all resolved first.
    let slices = mem.get_slices(addr, usize::try_from(len).map_err(|_| "too long")?).collect::<Result<Vec<_>, _>>().map_err(|_| "not guest memory")?;
    for slice in slices {
        let host = slice.ptr_guard_mut().as_ptr();
        // SAFETY: `host..host+len` is guest memory this process maps (vm-memory just resolved
        // it), page-aligned because guest memory regions are; MADV_REMOVE frees the backing
        // pages of a shared file mapping, after which they read as zeros. Rust holds no
        // reference into guest memory: it is only ever reached through volatile accesses.
        let r = unsafe { libc::madvise(host.cast(), slice.len(), libc::MADV_REMOVE) };
        if r != 0 {
            return Err("madvise failed");
        }
    }
    Ok(())
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_balloon_config: num_pages, actual (then fields of features not offered).
        let mut config = [0u8; 8];
        config[4..8].copy_from_slice(&self.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }

    fn process(&mut self, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match event {
            DeviceEvent::Queue(REPORTING) => queues.get_mut(REPORTING).is_some_and(|q| self.process_reports(q, mem)),
            DeviceEvent::Queue(i @ (INFLATE | DEFLATE)) => queues.get_mut(i).is_some_and(|q| Self::return_unasked(q, mem)),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.actual = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::TestDriver;
    use crate::vstate::memory::{backed_pages, create};
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reported_blocks_go_back_to_the_host_and_read_as_zeros() {
        let d = TestDriver::with_memory(create(64).expect("memfd guest memory"));
        let mut q = d.queue(0x10000);
        // The guest used 4 MiB at 8 MiB, then freed them.
        d.mem.write_slice(&vec![0x5a; 4 * MIB as usize], GuestAddress(8 * MIB)).expect("touch");
        let mut balloon = BalloonDevice::default();
        let head = d.post(&mut q, &[(8 * MIB, 2 * MIB as u32, true), (10 * MIB, 2 * MIB as u32, true)]);
        assert!(balloon.process_reports(&mut q.queue, &d.mem));
        assert_eq!(d.take_used(&mut q), vec![(head, 0)]);
        assert_eq!(backed_pages(&d.mem, 8 << 20..12 << 20), 0, "every reported page is back with the host");
        assert_eq!(d.read(8 * MIB, 4096), vec![0; 4096], "a reported page reads as zeros");
        assert_eq!((balloon.reported_bytes, balloon.rejected), (4 * MIB, 0));
    }

    #[test]
    fn ranges_that_are_not_guest_memory_or_whole_pages_are_refused() {
        let d = TestDriver::with_memory(create(64).expect("memfd guest memory"));
        let mut q = d.queue(0x10000);
        d.mem.write_slice(&vec![0x5a; 2 * MIB as usize], GuestAddress(8 * MIB)).expect("touch");
        d.mem.write_slice(&vec![0x5a; MIB as usize], GuestAddress(63 * MIB)).expect("touch the last MiB");
        let mut balloon = BalloonDevice::default();
        // Past the end of guest memory; straddling its end; unaligned; the middle of a page.
        let head = d.post(&mut q, &[(64 * MIB, 2 * MIB as u32, true), (63 * MIB, 2 * MIB as u32, true), (8 * MIB + 1, 4096, true), (8 * MIB, 100, true)]);
        assert!(balloon.process_reports(&mut q.queue, &d.mem));
        assert_eq!(d.take_used(&mut q), vec![(head, 0)]);
        assert_eq!(backed_pages(&d.mem, 8 << 20..10 << 20), 512, "nothing was dropped");
        assert_eq!(backed_pages(&d.mem, 63 << 20..64 << 20), 256, "a report straddling the end drops none of the part inside");
        assert_eq!(d.read(8 * MIB, 4), vec![0x5a; 4]);
        assert_eq!((balloon.reported_bytes, balloon.rejected), (0, 4));
    }
}
