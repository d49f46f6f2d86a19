//! virtio-rng: fills the guest's buffers from the host's getrandom(2), so a fresh guest has
//! entropy for its first TLS handshake without waiting for its own pool.

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::device::{DeviceEvent, VirtioDevice};

pub const QUEUE_SIZE: u16 = 64;
/// Bytes served per buffer at most; a driver asking for more gets this much (as it allows).
pub const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct RngDevice {
    /// Buffers returned empty (unwritable chains, getrandom failures).
    pub rejected: u64,
}

impl RngDevice {
    pub fn process_queue<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> bool {
        let mut used = false;
        let mut buf = vec![0u8; 0];
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(MAX_PER_REQUEST);
                    buf.resize(n, 0);
                    match getrandom(&mut buf).and_then(|_| w.write_all(&buf)) {
                        Ok(()) => n as u32,
                        Err(e) => {
                            tracing::warn!(error = %e, "virtio-rng: buffer returned empty");
                            self.rejected += 1;
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-rng: malformed chain returned empty");
                    self.rejected += 1;
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::error!(error = %e, "virtio-rng: cannot return a buffer");
                return used;
            }
            used = true;
        }
        used
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the live buffer `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for RngDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process(&mut self, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match (event, queues.first_mut()) {
            (DeviceEvent::Queue(0), Some(q)) => self.process_queue(q, mem),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::TestDriver;

    #[test]
    fn fills_writable_buffers_and_refuses_readable_ones() {
        let mut d = TestDriver::new();
        let mut q = d.queue(0x10000);
        let mut rng = RngDevice::default();
        let a = d.buffer(&[], 64);
        let b = d.buffer(&[], 64);
        let h1 = d.post(&mut q, &[(a, 32, true), (b, 32, true)]);
        let c = d.buffer(&[7; 16], 16);
        let h2 = d.post(&mut q, &[(c, 16, false)]);
        assert!(rng.process_queue(&mut q.queue, &d.mem));
        assert_eq!(d.take_used(&mut q), vec![(h1, 64), (h2, 0)]);
        let (x, y) = (d.read(a, 32), d.read(b, 32));
        assert_ne!(x, vec![0; 32]);
        assert_ne!(x, y, "two buffers get different bytes");
        assert_eq!(d.read(c, 16), vec![7; 16], "a device-readable buffer is left alone");
        assert_eq!(rng.rejected, 0, "an empty writer is not an error");
    }
}
