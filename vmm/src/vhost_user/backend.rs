//! One vhost-user backend for any `VirtioDevice`: the same trait the in-process virtio-mmio
//! transport drives, so a device's queue logic is written once and QEMU gets exactly what the
//! in-process VMM's guests get.
//!
//! The daemon's event ids: 0..num_queues are the queues' kicks, num_queues is the exit event
//! (the daemon's own), and num_queues + 1 + i is the device's host fd i (`host_fds()`).

use std::os::fd::RawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{ExitEvent, VhostUserError, BASE_FEATURES};
use crate::devices::virtio::worker::should_serve;
use crate::devices::virtio::{DeviceEvent, VirtioDevice};

/// Where the frontend (QEMU) gets the device's config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSpace {
    /// From the backend (VHOST_USER_PROTOCOL_F_CONFIG): `len` bytes read through
    /// `VirtioDevice::read_config`; a read reaching past them gets only what lies within,
    /// which the vhost-user library answers as a failed read.
    FromBackend { len: usize },
    /// QEMU supplies it itself (vhost-user-fs-pci holds the tag); the backend is never asked.
    FromFrontend,
}

pub struct DeviceBackend<D> {
    device: D,
    queue_max_sizes: Vec<u16>,
    config_space: ConfigSpace,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: ExitEvent,
}

impl<D: VirtioDevice> DeviceBackend<D> {
    pub fn new(device: D, config_space: ConfigSpace) -> Result<DeviceBackend<D>, VhostUserError> {
        let exit = ExitEvent::new()?;
        let queue_max_sizes = device.queue_max_sizes();
        Ok(DeviceBackend { device, queue_max_sizes, config_space, mem: None, exit })
    }

    /// The device's host fds with the daemon event id each is registered under, and whether
    /// they are watched edge-triggered.
    pub fn host_events(&self) -> (Vec<(RawFd, u16)>, bool) {
        let first = self.queue_max_sizes.len() + 1;
        let fds = self.device.host_fds().into_iter().enumerate().map(|(i, fd)| (fd, (first + i) as u16)).collect();
        (fds, self.device.host_fds_edge_triggered())
    }

    /// The device event a daemon event id stands for (None for the exit event).
    fn device_event(&self, id: u16) -> Option<DeviceEvent> {
        let queues = self.queue_max_sizes.len();
        let id = usize::from(id);
        match id.cmp(&queues) {
            std::cmp::Ordering::Less => Some(DeviceEvent::Queue(id)),
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Greater => Some(DeviceEvent::Host(id - queues - 1)),
        }
    }
}

impl<D: VirtioDevice + Sync> VhostUserBackendMut for DeviceBackend<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queue_max_sizes.len()
    }

    fn max_queue_size(&self) -> usize {
        self.queue_max_sizes.iter().copied().max().map_or(0, usize::from)
    }

    fn features(&self) -> u64 {
        BASE_FEATURES | self.device.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        match self.config_space {
            ConfigSpace::FromBackend { .. } => VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ,
            ConfigSpace::FromFrontend => VhostUserProtocolFeatures::MQ,
        }
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // EVENT_IDX is not offered: every used buffer is signalled.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let ConfigSpace::FromBackend { len } = self.config_space else { return Vec::new() };
        let start = (offset as usize).min(len);
        let end = start.saturating_add(size as usize).min(len);
        let mut data = vec![0u8; end - start];
        self.device.read_config(start as u64, &mut data);
        data
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.pair()
    }

    /// Hands the device the queues for `device_event` under the vrings' locks, then signals
    /// each vring whose used ring moved.
    fn handle_event(&mut self, device_event: u16, _evset: EventSet, vrings: &[VringRwLock], _thread: usize) -> std::io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let Some(event) = self.device_event(device_event) else { return Ok(()) };
        let mem = atomic.memory();
        let mut used_rings_moved = Vec::with_capacity(vrings.len());
        {
            let mut states: Vec<_> = vrings.iter().map(|v| v.get_mut()).collect();
            // The device serves a slice of queues, as in process; the vrings get theirs back
            // before their locks are released.
            let mut queues: Vec<Queue> = states.iter_mut().map(|s| std::mem::take(s.get_queue_mut())).collect();
            let used_before: Vec<u16> = queues.iter().map(|q| q.next_used()).collect();
            let used = should_serve(event, &queues) && self.device.process(event, &mut queues, &mem);
            for ((state, queue), before) in states.iter_mut().zip(queues).zip(used_before) {
                // The device used buffers of this queue if its used index moved. (Only a guest
                // that refilled a queue 2^16 times during one call could hide a move, and
                // the missed signal would stall only its own queue.)
                used_rings_moved.push(used && queue.next_used() != before);
                *state.get_queue_mut() = queue;
            }
        }
        for (vring, moved) in vrings.iter().zip(used_rings_moved) {
            if moved {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{BlockDevice, F_FLUSH, F_RO};
    use crate::devices::virtio::rng::RngDevice;
    use crate::devices::virtio::test_driver::{TestDriver, TestQueue, QSIZE};
    use crate::devices::virtio::vsock::VsockDevice;

    /// A vring as QEMU's messages would set it up, over the test driver's queue.
    fn vring(mem: &GuestMemoryAtomic<GuestMemoryMmap>, q: &TestQueue) -> VringRwLock {
        let v = VringRwLock::new(mem.clone(), QSIZE).unwrap();
        v.set_queue_size(QSIZE);
        v.set_queue_info(q.desc.0, q.avail.0, q.used.0).unwrap();
        v.set_queue_ready(true);
        v
    }

    #[test]
    fn a_kicked_ready_vring_is_served_once_guest_memory_is_known() {
        let mut d = TestDriver::new();
        let mut q = d.queue(0x10000);
        let mem = GuestMemoryAtomic::new(d.mem.clone());
        let vrings = [vring(&mem, &q)];
        let mut backend = DeviceBackend::new(RngDevice::default(), ConfigSpace::FromFrontend).unwrap();
        assert_eq!((backend.num_queues(), backend.max_queue_size()), (1, 64));
        assert_eq!(backend.features(), BASE_FEATURES);
        assert_eq!(backend.protocol_features(), VhostUserProtocolFeatures::MQ);
        assert!(backend.get_config(0, 4).is_empty(), "QEMU has the config space");

        let buf = d.buffer(&[], 32);
        let head = d.post(&mut q, &[(buf, 32, true)]);
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert!(d.take_used(&mut q).is_empty(), "no guest memory yet: nothing served");
        backend.update_memory(mem.clone()).unwrap();
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(d.take_used(&mut q), vec![(head, 32)]);
        assert_ne!(d.read(buf, 32), vec![0; 32]);

        vrings[0].set_queue_ready(false);
        let buf = d.buffer(&[], 8);
        d.post(&mut q, &[(buf, 8, true)]);
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert!(d.take_used(&mut q).is_empty(), "a stopped vring is not served");
        vrings[0].set_queue_ready(true);
        backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
        assert!(d.take_used(&mut q).is_empty(), "the exit event's id is not a queue");
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(d.take_used(&mut q).len(), 1, "the vring kept its place across the events");
    }

    #[test]
    fn a_backend_config_space_is_read_within_its_length_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let device = BlockDevice::open(&path, true, "x").unwrap();
        let backend = DeviceBackend::new(device, ConfigSpace::FromBackend { len: 8 }).unwrap();
        assert_eq!(backend.protocol_features(), VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        assert_eq!(backend.features(), BASE_FEATURES | F_FLUSH | F_RO, "the device's features too");
        assert_eq!(backend.get_config(0, 8), 8u64.to_le_bytes(), "capacity in sectors");
        assert_eq!(backend.get_config(4, 8), vec![0; 4], "a read past the end gets what lies within");
        assert!(backend.get_config(9, 4).is_empty());
    }

    #[test]
    fn host_fds_get_the_event_ids_after_the_exit_event() {
        let dir = tempfile::tempdir().unwrap();
        let device = VsockDevice::new(3, &dir.path().join("vsock.sock")).unwrap();
        let epoll_fd = device.muxer.epoll_fd();
        let backend = DeviceBackend::new(device, ConfigSpace::FromBackend { len: 8 }).unwrap();
        assert_eq!(backend.host_events(), (vec![(epoll_fd, 4)], false), "vsock's three queues, the exit event, then its epoll fd");
        assert_eq!(backend.device_event(1), Some(DeviceEvent::Queue(1)));
        assert_eq!(backend.device_event(3), None);
        assert_eq!(backend.device_event(4), Some(DeviceEvent::Host(0)));
        assert_eq!(backend.get_config(0, 8), 3u64.to_le_bytes(), "the guest CID");
    }
}
