//! The virtio-fs device as a vhost-user backend (QEMU's `vhost-user-fs-pci`; QEMU supplies the
//! tag in its own config space).

use std::path::Path;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{ExitEvent, VhostUserError, BASE_FEATURES};
use crate::devices::virtio::fs::{FsDevice, NUM_QUEUES, QUEUE_SIZE};

pub struct FsBackend {
    device: FsDevice,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: ExitEvent,
}

impl FsBackend {
    pub fn new(shared_dir: &Path, tag: &str) -> Result<FsBackend, VhostUserError> {
        let exit = ExitEvent::new()?;
        Ok(FsBackend { device: FsDevice::new(shared_dir, tag)?, mem: None, exit })
    }
}

impl VhostUserBackendMut for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        BASE_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.pair()
    }

    fn handle_event(&mut self, device_event: u16, _evset: EventSet, vrings: &[VringRwLock], _thread: usize) -> std::io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let Some(vring) = vrings.get(usize::from(device_event)) else { return Ok(()) };
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        let mem = atomic.memory();
        if self.device.process_queue(vring.get_mut().get_queue_mut(), &mem) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Serves one vhost-user connection (one VM) on `socket` until the VM goes away.
pub fn serve(socket: &Path, shared_dir: &Path, tag: &str) -> Result<(), VhostUserError> {
    let backend = Arc::new(RwLock::new(FsBackend::new(shared_dir, tag)?));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("hull-fs".into(), backend, mem)
        .map_err(|e| VhostUserError::Daemon(e.to_string()))?;
    tracing::info!(socket = ?socket, shared_dir = ?shared_dir, tag, "vhost-user fs backend listening");
    daemon
        .serve(socket)
        .map_err(|e| VhostUserError::Serve { socket: socket.into(), reason: e.to_string() })?;
    tracing::info!(socket = ?socket, "vhost-user fs backend: the VM disconnected");
    Ok(())
}
