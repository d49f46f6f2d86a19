//! The vsock device as a vhost-user backend.

use std::path::Path;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{ExitEvent, VhostUserError, BASE_FEATURES};
use crate::devices::virtio::vsock::{VsockDevice, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

/// The event id of the device's own epoll fd; ids up to NUM_QUEUES are the daemon's.
const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;

pub struct VsockBackend {
    device: VsockDevice,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: ExitEvent,
}

impl VsockBackend {
    pub fn new(guest_cid: u64, uds: &Path) -> Result<VsockBackend, VhostUserError> {
        let exit = ExitEvent::new()?;
        Ok(VsockBackend { device: VsockDevice::new(guest_cid, uds)?, mem: None, exit })
    }

    fn process(&mut self, event: u16, vrings: &[VringRwLock]) -> std::io::Result<()> {
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let (rx, tx) = (&vrings[RX_QUEUE], &vrings[TX_QUEUE]);
        // Host sockets can have data before the driver has set the queues up (or after it reset
        // them); such data waits in the muxer until the queue is ready.
        let ready = |v: &VringRwLock| v.get_ref().get_queue().ready();
        if event == TX_QUEUE as u16 && ready(tx) {
            let used = self.device.process_tx(tx.get_mut().get_queue_mut(), &*mem);
            if used {
                tx.signal_used_queue()?;
            }
        } else if event == HOST_EVENT {
            self.device.muxer.process_host_events();
        }
        // Whatever happened may have given the guest something to receive.
        if ready(rx) && self.device.muxer.has_rx() && self.device.process_rx(rx.get_mut().get_queue_mut(), &*mem) {
            rx.signal_used_queue()?;
        }
        Ok(())
    }
}


impl VhostUserBackendMut for VsockBackend {
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
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // EVENT_IDX is not offered: every used buffer is signalled.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.device.config();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.pair()
    }

    fn handle_event(&mut self, device_event: u16, _evset: EventSet, vrings: &[VringRwLock], _thread: usize) -> std::io::Result<()> {
        self.process(device_event, vrings)
    }
}

/// Serves one vhost-user connection (one VM) on `socket` until the VM goes away.
pub fn serve(socket: &Path, uds: &Path, guest_cid: u64) -> Result<(), VhostUserError> {
    let backend = Arc::new(RwLock::new(VsockBackend::new(guest_cid, uds)?));
    let host_fd = backend.read().map_err(|_| VhostUserError::Daemon("poisoned".into()))?.device.muxer.epoll_fd();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("hull-vsock".into(), backend, mem)
        .map_err(|e| VhostUserError::Daemon(e.to_string()))?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(host_fd, EventSet::IN, u64::from(HOST_EVENT))
            .map_err(VhostUserError::Register)?;
    }
    tracing::info!(socket = ?socket, uds = ?uds, guest_cid, "vhost-user vsock backend listening");
    daemon
        .serve(socket)
        .map_err(|e| VhostUserError::Serve { socket: socket.into(), reason: e.to_string() })?;
    tracing::info!(socket = ?socket, "vhost-user vsock backend: the VM disconnected");
    Ok(())
}
