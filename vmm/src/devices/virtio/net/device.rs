//! The net device's queue processing, independent of its transport.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::device::{read_config_bytes, DeviceEvent, VirtioDevice};

pub struct NetDevice {
    /// None: a NIC with no cable (a snapshot's template VM): frames sent are dropped, none come.
    tap: Option<Tap>,
    mac: [u8; 6],
    /// A frame read from the tap that waits for an RX buffer (its length in `frame`).
    pending: Option<usize>,
    frame: Vec<u8>,
    /// Frames dropped: too large for the guest's buffer, tap write failures, malformed chains.
    pub dropped: u64,
}

impl NetDevice {
    pub fn new(tap: Option<Tap>, mac: [u8; 6]) -> NetDevice {
        NetDevice { tap, mac, pending: None, frame: vec![0; HDR_LEN + MAX_FRAME], dropped: 0 }
    }

    /// Sends every frame the guest queued to the tap. A frame the tap cannot take now is
    /// dropped, as a NIC drops on a full ring; TCP resends.
    pub fn process_tx<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) if (HDR_LEN..=HDR_LEN + MAX_FRAME).contains(&r.available_bytes()) => {
                    let n = r.available_bytes();
                    match r.read_exact(&mut self.frame[..n]) {
                        Ok(()) => match &mut self.tap {
                            Some(tap) => {
                                if let Err(e) = tap.write_frame(&self.frame[..n]) {
                                    self.dropped += 1;
                                    tracing::debug!(error = %e, "virtio-net: tap write failed; frame dropped");
                                }
                            }
                            None => self.dropped += 1,
                        },
                        Err(e) => {
                            self.dropped += 1;
                            tracing::warn!(error = %e, "virtio-net: unreadable TX chain dropped");
                        }
                    }
                }
                Ok(r) => {
                    self.dropped += 1;
                    tracing::warn!(len = r.available_bytes(), "virtio-net: TX chain shorter than a header or longer than a frame dropped");
                }
                Err(e) => {
                    self.dropped += 1;
                    tracing::warn!(error = %e, "virtio-net: malformed TX chain dropped");
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::error!(error = %e, "virtio-net: cannot return a TX buffer");
                return used;
            }
            used = true;
        }
        used
    }

    /// Moves frames from the tap into the guest's RX buffers until either runs out. The tap is
    /// watched edge-triggered, so it is drained here whenever there are buffers.
    pub fn process_rx<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> bool {
        let mut used = false;
        let Some(tap) = &mut self.tap else { return false };
        loop {
            let n = match self.pending {
                Some(n) => n,
                None => match tap.read_frame(&mut self.frame) {
                    Ok(n) if n >= HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return used,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "virtio-net: tap read failed");
                        return used;
                    }
                },
            };
            self.pending = Some(n);
            let Some(chain) = queue.pop_descriptor_chain(mem) else { return used };
            let head = chain.head_index();
            // Without MRG_RXBUF one buffer holds one frame: num_buffers is 1.
            self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= n => match w.write_all(&self.frame[..n]) {
                    Ok(()) => n as u32,
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-net: RX buffer unwritable; frame dropped");
                        self.dropped += 1;
                        0
                    }
                },
                Ok(w) => {
                    tracing::warn!(frame = n, buffer = w.available_bytes(), "virtio-net: RX buffer too small; frame dropped");
                    self.dropped += 1;
                    0
                }
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-net: malformed RX chain; frame dropped");
                    self.dropped += 1;
                    0
                }
            };
            self.pending = None;
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::error!(error = %e, "virtio-net: cannot return an RX buffer");
                return used;
            }
            used = true;
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    /// mac[6] (status and the rest are not offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn host_fds(&self) -> Vec<RawFd> {
        self.tap.iter().map(AsRawFd::as_raw_fd).collect()
    }

    fn host_fds_edge_triggered(&self) -> bool {
        true
    }

    fn process(&mut self, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if event == DeviceEvent::Queue(TX_QUEUE) {
            if let Some(tx) = queues.get_mut(TX_QUEUE).filter(|q| q.ready()) {
                used |= self.process_tx(tx, mem);
            }
        }
        // New RX buffers or tap readiness: drain the tap into the guest.
        if let Some(rx) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) {
            used |= self.process_rx(rx, mem);
        }
        used
    }
}
