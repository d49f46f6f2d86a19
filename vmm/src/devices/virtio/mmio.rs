//! The virtio-mmio transport (virtio 1.2, 4.2, version 2 "modern" layout): the registers a
//! driver programs to negotiate features and place the queues. On DRIVER_OK the queues go to a
//! worker thread that serves the device; queue notifications arrive on eventfds (KVM signals
//! them directly when they are registered as ioeventfds on QueueNotify) and the device's
//! interrupt is an irqfd. The transport knows nothing of KVM: `device_manager` does the wiring.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::{InterruptLine, VirtioDevice, F_VERSION_1};
use super::worker::{Worker, WorkerError, WorkerSetup};

/// One page per device.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x6c6c_7568; // "hull"

/// Where the device's config space starts in its page (virtio_bindings' `VIRTIO_MMIO_CONFIG`);
/// the registers (virtio_bindings' `VIRTIO_MMIO_*` offsets) lie below it.
const CONFIG: u64 = VIRTIO_MMIO_CONFIG as u64;

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: InterruptLine,
    /// One per queue; registered as ioeventfds by `device_manager`.
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// Serves the device once activated; started with the transport.
    worker: Worker,
    active: bool,
    name: String,
}

/// A queue as a snapshot keeps it (virtio-queue's `QueueState`, which has no serde).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SavedQueue {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> SavedQueue {
        SavedQueue {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> QueueState {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio device as a snapshot keeps it: the registers the driver wrote, and the queues
/// as the device's worker had them (their positions in the rings).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransportState {
    pub name: String,
    pub device_type: u32,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
    interrupt_status: u32,
    active: bool,
    /// The queue registers (frozen at DRIVER_OK).
    queues: Vec<SavedQueue>,
    /// The worker's queues: where it had got to in each ring (empty unless active).
    live: Vec<SavedQueue>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportSnapshotError {
    #[error("The snapshot's device {saved} (type {saved_type}, {saved_queues} queues) is not this VM's {name} (type {device_type}, {queues} queues).")]
    Mismatch { saved: String, saved_type: u32, saved_queues: usize, name: String, device_type: u32, queues: usize },
    #[error("The snapshot's queue {queue} of {name} is not valid: {source:?}.")]
    Queue { name: String, queue: usize, source: virtio_queue::Error },
    #[error("The snapshot's queue {queue} of {name} has rings outside guest memory.")]
    QueueOutside { name: String, queue: usize },
    #[error("The device {name} cannot start from the snapshot: {source}.")]
    Activate { name: String, source: WorkerError },
    #[error("The device {name}'s worker is gone: {source}.")]
    Worker { name: String, source: WorkerError },
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("Cannot create a queue eventfd: {0}.")]
    EventFd(#[source] std::io::Error),
    #[error("The device offers a queue of size {0}, which virtio does not allow.")]
    QueueSize(u16),
    #[error("Cannot start the device's worker: {0}.")]
    Worker(#[from] WorkerError),
}

impl MmioTransport {
    /// The device's worker thread starts now and installs `seccomp` (if any) on itself.
    pub fn new(
        name: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: InterruptLine,
        seccomp: Option<crate::seccomp::Filter>,
    ) -> Result<MmioTransport, MmioError> {
        let sizes = lock(&device).queue_max_sizes();
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for size in sizes {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueSize(size))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        let worker = Worker::spawn(WorkerSetup {
            name: name.into(),
            device: device.clone(),
            queue_evts: queue_evts.iter().map(EventFd::try_clone).collect::<Result<_, _>>().map_err(MmioError::EventFd)?,
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            seccomp,
        })?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            worker,
            active: false,
            name: name.into(),
        })
    }

    /// The queue notification eventfds, in queue order (for KVM_IOEVENTFD with the queue
    /// index as datamatch).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn features(&self) -> u64 {
        lock(&self.device).features() | F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only before DRIVER_OK (virtio 1.2, 4.2.3.2).
    fn configuring(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        // Registers are 32-bit; other widths read as zero (the spec makes them undefined).
        // Below CONFIG the offset fits a u32, the type of virtio_bindings' offsets.
        let value = if data.len() == 4 {
            match offset as u32 {
                VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
                VIRTIO_MMIO_VERSION => VERSION,
                VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
                VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
                VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                    0 => self.features() as u32,
                    1 => (self.features() >> 32) as u32,
                    _ => 0,
                },
                VIRTIO_MMIO_QUEUE_NUM_MAX => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.max_size())),
                VIRTIO_MMIO_QUEUE_READY => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.ready())),
                VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
                VIRTIO_MMIO_STATUS => self.status,
                VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
                // No device here has shared memory regions, and a region that does not exist
                // reads as length (and base) all ones (virtio 1.2, 4.2.2). Zero would be a region
                // of no bytes: a guest with FUSE_DAX then sets up a DAX window on the virtio-fs
                // device and every mount of the share fails (EINVAL).
                VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH | VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
                _ => 0,
            }
        } else {
            0
        };
        data.fill(0);
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock(&self.device).write_config(offset - CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(device = %self.name, offset, len = data.len(), "virtio-mmio: register write of the wrong width ignored");
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configuring = self.configuring();
        // Below CONFIG the offset fits a u32, the type of virtio_bindings' offsets.
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configuring => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if configuring => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if configuring => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configuring => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configuring => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configuring => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            VIRTIO_MMIO_QUEUE_USED_LOW if configuring => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            VIRTIO_MMIO_QUEUE_USED_HIGH if configuring => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            // Reached only when the notify is not an ioeventfd (or for a queue the device does
            // not have): signal the queue's eventfd the way KVM would.
            VIRTIO_MMIO_QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => tracing::debug!(device = %self.name, queue = v, "virtio-mmio: notify for a queue the device does not have"),
            },
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => tracing::debug!(device = %self.name, offset, value = v, "virtio-mmio: write to a read-only or unknown register ignored"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.2, 2.1.2); anything else is refused.
        if v & self.status != self.status {
            tracing::warn!(device = %self.name, from = self.status, to = v, "virtio-mmio: status bits cleared without a reset; ignored");
            return;
        }
        let added = v & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Leaving FEATURES_OK unset tells the driver the features were not accepted.
                tracing::warn!(device = %self.name, offered, asked = self.driver_features, "virtio-mmio: the driver asked for features the device does not offer, or not VERSION_1");
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                tracing::error!(device = %self.name, error = %e, "virtio-mmio: cannot activate the device");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(ActivateError::NoFeaturesOk);
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        // The worker gets its own copies of the queues; the transport's stay frozen until reset.
        let queues = self.queues.iter().map(|q| Queue::try_from(q.state())).collect::<Result<Vec<_>, _>>().map_err(|_| ActivateError::InvalidQueue(usize::MAX))?;
        self.worker.activate(queues, self.driver_features, false)?;
        self.active = true;
        tracing::info!(device = %self.name, features = self.driver_features, "virtio device activated");
        Ok(())
    }

    fn reset(&mut self) {
        // The worker resets the device itself, between two requests.
        if let Err(e) = self.worker.reset() {
            tracing::error!(device = %self.name, error = %e, "virtio-mmio: cannot reset the device");
        }
        self.active = false;
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }

    /// Stops the device's worker (and a vhost-user backend's queues) and returns the device's
    /// state; the worker stays stopped until `thaw`.
    pub fn freeze(&mut self) -> Result<TransportState, TransportSnapshotError> {
        let device_type = lock(&self.device).device_type();
        let live = self.worker.freeze().map_err(|source| TransportSnapshotError::Worker { name: self.name.clone(), source })?;
        Ok(TransportState {
            name: self.name.clone(),
            device_type,
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            active: self.active,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            live: if self.active { live.into_iter().map(SavedQueue::from).collect() } else { Vec::new() },
        })
    }

    /// Lets the worker serve the device again after `freeze`.
    pub fn thaw(&self) {
        if let Err(e) = self.worker.thaw() {
            tracing::error!(device = %self.name, error = %e, "virtio-mmio: cannot restart the device after a snapshot");
        }
    }

    /// Makes this new device what `state` saved (a device of the same type and queues): the
    /// registers, then, if the driver had started it, its worker on the saved queues. The
    /// device is told it was restored (vsock resets the driver's transport).
    pub fn restore(&mut self, state: &TransportState) -> Result<(), TransportSnapshotError> {
        let (device_type, max_sizes) = {
            let d = lock(&self.device);
            (d.device_type(), d.queue_max_sizes())
        };
        // Each queue as this device offers it: its largest size, a size within it.
        let fits = |qs: &[SavedQueue]| qs.iter().zip(&max_sizes).all(|(q, &max)| q.max_size == max && q.size <= max);
        if state.device_type != device_type
            || state.queues.len() != self.queues.len()
            || (state.active && state.live.len() != self.queues.len())
            || !fits(&state.queues)
            || !fits(&state.live)
            || (state.active && state.status & VIRTIO_CONFIG_S_DRIVER_OK == 0)
        {
            return Err(TransportSnapshotError::Mismatch {
                saved: state.name.clone(),
                saved_type: state.device_type,
                saved_queues: state.queues.len(),
                name: self.name.clone(),
                device_type,
                queues: self.queues.len(),
            });
        }
        let queue = |queue: usize, q: &SavedQueue| Queue::try_from(QueueState::from(*q)).map_err(|source| TransportSnapshotError::Queue { name: self.name.clone(), queue, source });
        self.queues = state.queues.iter().enumerate().map(|(i, q)| queue(i, q)).collect::<Result<_, _>>()?;
        let live = state.live.iter().enumerate().map(|(i, q)| queue(i, q)).collect::<Result<Vec<_>, _>>()?;
        // As at DRIVER_OK: a ready queue's rings must lie in guest memory.
        if let Some(bad) = live.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
            return Err(TransportSnapshotError::QueueOutside { name: self.name.clone(), queue: bad });
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.status.store(state.interrupt_status, Ordering::SeqCst);
        if state.active {
            self.worker.activate(live, self.driver_features, true).map_err(|source| TransportSnapshotError::Activate { name: self.name.clone(), source })?;
            self.active = true;
            // An interrupt raised just before the save may not have reached a vCPU: raised
            // again (a virtio-mmio interrupt with nothing new is harmless).
            let pending = state.interrupt_status;
            if pending != 0 {
                self.interrupt.signal(pending);
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the worker has stopped because the device broke (for tests and `state`).
    pub fn broken(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set DRIVER_OK without FEATURES_OK")]
    NoFeaturesOk,
    #[error("queue {0} is ready but its rings are not in guest memory or its size is invalid")]
    InvalidQueue(usize),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
