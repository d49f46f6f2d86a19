//! What a virtio device is to its transport: a type, queues, features, a config space, and a
//! function that serves the queues when the guest or the host side has something for it.
//!
//! Both transports reach devices through this trait only: the in-process VMM from the
//! virtio-mmio transport's worker, QEMU through the generic vhost-user backend
//! (`crate::vhost_user::DeviceBackend`).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The feature every device offers (as a mask of the feature bit virtio_bindings numbers).
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// Why the device's worker woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The driver notified queue N.
    Queue(usize),
    /// The device's host fd N (index into `host_fds()`) is readable.
    Host(usize),
}

pub trait VirtioDevice: Send {
    /// The device id (virtio 1.2, 5): one of virtio_bindings' `virtio_ids::VIRTIO_ID_*`.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features offered (F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the config space at `offset` (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the config space; ignored unless the device has writable fields.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Host-side fds whose readiness the device serves (vsock's muxer).
    fn host_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Whether the host fds are watched edge-triggered: the device then drains them whenever
    /// it can, instead of being woken while it cannot (a tap with no RX buffers to fill).
    fn host_fds_edge_triggered(&self) -> bool {
        false
    }
    /// Serves the queues after `event`. Returns whether buffers were used (the guest is then
    /// interrupted). Runs on the device's worker thread with the queues the driver set up.
    fn process(&mut self, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device: forget per-driver state.
    fn reset(&mut self) {}
    /// The VM was restored from a snapshot, this device with it, and its queues are the driver's
    /// again: anything the driver must learn about the change is sent now. Returns whether
    /// buffers were used.
    fn restored(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// A snapshot is taken: `queues` (the worker's) are brought up to where the device is in
    /// each ring, and the device serves nothing until `thaw`. A device whose queues another
    /// process serves takes them back from it here.
    fn freeze(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> std::io::Result<()> {
        Ok(())
    }
    /// The snapshot is taken: serve `queues` again (`kicks` as in `activate`).
    fn thaw(&mut self, _queues: &[Queue], _kicks: &[EventFd], _mem: &GuestMemoryMmap) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether another process serves the queues (a vhost-user backend): the worker then
    /// leaves the queues' notifications to it, and the device gets them in `activate`.
    fn queues_served_elsewhere(&self) -> bool {
        false
    }
    /// The driver set DRIVER_OK having accepted `features`, with `queues` as it set them up;
    /// `kicks` are their notification eventfds. A device whose queues another process serves
    /// hands them over here; an error leaves the device needing a reset.
    fn activate(&mut self, _features: u64, _queues: &[Queue], _kicks: &[EventFd], _mem: &GuestMemoryMmap) -> std::io::Result<()> {
        Ok(())
    }
}

/// The device's interrupt: the virtio-mmio interrupt status bits (virtio_bindings'
/// `VIRTIO_MMIO_INT_VRING` and `VIRTIO_MMIO_INT_CONFIG`) and an irqfd KVM injects.
#[derive(Clone)]
pub struct InterruptLine {
    pub status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl InterruptLine {
    pub fn new(irqfd: EventFd) -> InterruptLine {
        InterruptLine { status: Arc::new(AtomicU32::new(0)), irqfd: Arc::new(irqfd) }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    pub fn signal(&self, why: u32) {
        self.status.fetch_or(why, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!(error = %e, "virtio: cannot raise the interrupt");
        }
    }
}

/// Copies `data.len()` bytes of `config` from `offset`, zeros past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)).and_then(|o| config.get(o)).copied().unwrap_or(0);
    }
}
