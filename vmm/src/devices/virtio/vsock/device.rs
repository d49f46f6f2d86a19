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
}

impl VsockDevice {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<VsockDevice, VsockError> {
        Ok(VsockDevice { muxer: VsockMuxer::new(guest_cid, uds_path)? })
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

