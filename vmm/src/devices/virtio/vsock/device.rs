//! The vsock device's queue processing, shared by every transport: a transport hands it the
//! queues and guest memory and signals the guest when it reports used buffers.

use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemory;

use super::muxer::VsockMuxer;
use super::{VsockError, MAX_PKT_DATA};

pub struct VsockDevice {
    pub muxer: VsockMuxer,
    /// A transport reset was sent (the VM was restored) and the guest has not yet taken it:
    /// nothing goes to the guest until it has, or it would answer with the CID it had. Holds
    /// the event queue's available index when the reset was sent: the driver adds a buffer
    /// back once it has handled the event (read its new CID, reset its connections).
    reset_pending: Option<std::num::Wrapping<u16>>,
}

impl VsockDevice {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<VsockDevice, VsockError> {
        Ok(VsockDevice { muxer: VsockMuxer::new(guest_cid, uds_path)?, reset_pending: None })
    }

    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// The config space: the guest's CID as a little-endian u64.
    pub fn config(&self) -> [u8; 8] {
        self.guest_cid().to_le_bytes()
    }

    /// Takes every packet the guest queued for sending. Returns whether buffers were used
    /// (the transport then signals the guest). A malformed chain is returned unused and
    /// skipped; the device keeps going.
    pub fn process_tx<M>(&mut self, queue: &mut Queue, mem: &M) -> bool
    where
        M: GuestMemory,
    {
        let mut used = false;
        loop {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.handle_tx(&pkt),
                Err(e) => tracing::warn!(error = %e, "vsock: malformed TX chain dropped"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::error!(error = %e, "vsock: cannot return a TX buffer");
                return used;
            }
            used = true;
        }
        used
    }

    /// Fills RX buffers with whatever the host side has for the guest. Returns whether
    /// buffers were used.
    pub fn process_rx<M>(&mut self, queue: &mut Queue, mem: &M) -> bool
    where
        M: GuestMemory,
    {
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let parsed = VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA);
            let written = match parsed {
                Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt) {
                    Some(n) => n,
                    None => {
                        // Nothing after all: give the buffer back for later.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: malformed RX chain returned empty");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::error!(error = %e, "vsock: cannot return an RX buffer");
                return used;
            }
            used = true;
        }
        used
    }
}


impl crate::devices::virtio::device::VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![super::QUEUE_SIZE; super::NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config(), offset, data);
    }

    fn host_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.muxer.epoll_fd()]
    }

    /// The guest's connections were the snapshot's VM's and its CID may not be this VM's: a
    /// transport reset event (virtio 1.2, 5.10.6.6) makes the driver close every connection
    /// and read its CID again from the config space, before it sends anything with the old one.
    fn restored(&mut self, queues: &mut [Queue], mem: &vm_memory::GuestMemoryMmap) -> bool {
        use vm_memory::Bytes;
        let Some(events) = queues.get_mut(super::EVENT_QUEUE).filter(|q| q.ready()) else { return false };
        let Some(chain) = events.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset after a restore");
            return false;
        };
        let head = chain.head_index();
        let posted = events.avail_idx(mem, std::sync::atomic::Ordering::Acquire).ok();
        let mut written = 0;
        if let Some(desc) = chain.into_iter().find(|d| d.is_write_only() && d.len() >= 4) {
            // struct virtio_vsock_event { le32 id }: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is 0.
            if mem.write_obj(0u32.to_le(), desc.addr()).is_ok() {
                written = 4;
            }
        }
        if let Err(e) = events.add_used(mem, head, written) {
            tracing::error!(error = %e, "vsock: cannot return the transport reset event");
            return false;
        }
        tracing::info!(guest_cid = self.guest_cid(), "vsock: transport reset sent after a restore");
        self.reset_pending = posted;
        true
    }

    fn reset(&mut self) {
        // A driver that resets the device starts its event ring over: nothing to wait for.
        self.reset_pending = None;
    }

    fn process(&mut self, event: crate::devices::virtio::device::DeviceEvent, queues: &mut [Queue], mem: &vm_memory::GuestMemoryMmap) -> bool {
        use crate::devices::virtio::device::DeviceEvent;
        let mut used = false;
        match event {
            DeviceEvent::Queue(super::TX_QUEUE) => {
                if let Some(tx) = queues.get_mut(super::TX_QUEUE).filter(|q| q.ready()) {
                    used |= self.process_tx(tx, mem);
                }
            }
            DeviceEvent::Host(_) => {
                self.muxer.process_host_events();
            }
            // RX buffers arrived (served below), or event buffers.
            DeviceEvent::Queue(_) => {}
        }
        if let Some(posted) = self.reset_pending {
            let now = queues.get(super::EVENT_QUEUE).and_then(|q| q.avail_idx(mem, std::sync::atomic::Ordering::Acquire).ok());
            if now.is_some_and(|now| now != posted) {
                self.reset_pending = None;
                tracing::info!(guest_cid = self.guest_cid(), "vsock: the guest took the transport reset");
            } else {
                return used;
            }
        }
        if let Some(rx) = queues.get_mut(super::RX_QUEUE).filter(|q| q.ready()) {
            if self.muxer.has_rx() {
                used |= self.process_rx(rx, mem);
            }
        }
        used
    }
}
