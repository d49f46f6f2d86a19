//! hull's devices as vhost-user backends, for QEMU (`vhost-user-vsock-pci`, `vhost-user-fs-pci`)
//! and for hull-vmm itself (`frontend`: the builtin engine's virtio-fs): the same
//! `VirtioDevice`s the in-process VMM drives, behind one generic backend (`DeviceBackend`) that
//! speaks the vhost-user protocol. Serving another device is one more `serve_*` here.

mod backend;
pub mod frontend;

pub use backend::{ConfigSpace, DeviceBackend};
pub use frontend::{DeviceFace, FrontendDevice, FrontendError};

use std::path::Path;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::vsock::VsockDevice;
use crate::devices::virtio::VirtioDevice;

/// The virtio features every hull backend offers: virtio 1.0, and vhost-user protocol features
/// (EVENT_IDX is not offered: every used buffer is signalled).
pub const BASE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The event that stops a backend's worker thread, handed to the daemon per thread.
pub struct ExitEvent(EventConsumer, EventNotifier);

impl ExitEvent {
    pub fn new() -> Result<ExitEvent, VhostUserError> {
        let (c, n) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(VhostUserError::ExitEvent)?;
        Ok(ExitEvent(c, n))
    }

    /// What `VhostUserBackend::exit_event` returns.
    pub fn pair(&self) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.0.try_clone().ok()?, self.1.try_clone().ok()?))
    }
}

/// Why a backend could not serve. The vhost-user library's errors implement no
/// `std::error::Error`, so they are kept as values, not as sources.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error("Cannot create the vhost-user daemon: {0}.")]
    ExitEvent(#[source] std::io::Error),
    #[error("Cannot create the vhost-user daemon: {0}.")]
    Daemon(vhost_user_backend::Error),
    #[error("Cannot watch the device's host sockets: {0}.")]
    Register(#[source] std::io::Error),
    #[error("Cannot listen on the vhost-user socket {socket:?}: {source}.")]
    Listen { socket: std::path::PathBuf, #[source] source: std::io::Error },
    #[error("The vhost-user connection on {socket:?} failed: {error}.")]
    Serve { socket: std::path::PathBuf, error: vhost_user_backend::Error },
}

/// A vhost-user daemon serving one device, its host fds watched; `serve` waits for QEMU.
pub struct DeviceDaemon<D: VirtioDevice + Sync + 'static> {
    daemon: VhostUserDaemon<Arc<RwLock<DeviceBackend<D>>>>,
}

impl<D: VirtioDevice + Sync + 'static> DeviceDaemon<D> {
    /// `name` names the daemon's threads.
    pub fn new(name: &str, device: D, config_space: ConfigSpace) -> Result<DeviceDaemon<D>, VhostUserError> {
        let backend = DeviceBackend::new(device, config_space)?;
        let (host_events, edge_triggered) = backend.host_events();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let daemon = VhostUserDaemon::new(name.into(), Arc::new(RwLock::new(backend)), mem).map_err(VhostUserError::Daemon)?;
        let events = if edge_triggered { EventSet::IN | EventSet::EDGE_TRIGGERED } else { EventSet::IN };
        for handler in daemon.get_epoll_handlers() {
            for &(fd, id) in &host_events {
                handler.register_listener(fd, events, u64::from(id)).map_err(VhostUserError::Register)?;
            }
        }
        Ok(DeviceDaemon { daemon })
    }

    /// Serves one vhost-user connection (one VM) on `socket` until the VM goes away. The socket
    /// is owner-only from the moment it exists (the library's own listener binds with the
    /// umask, which the fs backend clears) and is removed when the VM is gone.
    pub fn serve(mut self, socket: &Path, filter: Option<&crate::seccomp::Filter>) -> Result<(), VhostUserError> {
        let listener = hull_proto::host_socket::bind_owner_only(socket).map_err(|source| VhostUserError::Listen { socket: socket.into(), source })?;
        // Everything from here on serves a guest: every thread (the daemon's workers exist
        // already) under the device filter, which has no bind, listen, mkdir or rename.
        if let Some(Err(e)) = filter.map(crate::seccomp::Filter::apply_all_threads) {
            // No socket may announce a backend that will not serve.
            let _ = std::fs::remove_file(socket);
            return Err(e.into());
        }
        let served = self.daemon.start(&mut Listener::from(listener)).and_then(|()| self.daemon.wait());
        for handler in self.daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        let _ = std::fs::remove_file(socket);
        match served {
            // A VM that quits mid-message is a VM going away, not a backend failure.
            Ok(()) | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage)) => Ok(()),
            Err(error) => Err(VhostUserError::Serve { socket: socket.into(), error }),
        }
    }
}

/// Serves the vsock device, its hybrid host side on `uds`, on `socket` until the VM goes away.
pub fn serve_vsock(socket: &Path, uds: &Path, guest_cid: u64, filter: Option<&crate::seccomp::Filter>) -> Result<(), VhostUserError> {
    let device = VsockDevice::new(guest_cid, uds)?;
    // QEMU's vhost-user-vsock-pci reads the guest CID from the backend.
    let config_space = ConfigSpace::FromBackend { len: device.config().len() };
    let daemon = DeviceDaemon::new("hull-vsock", device, config_space)?;
    tracing::info!(socket = ?socket, uds = ?uds, guest_cid, "vhost-user vsock backend listening");
    daemon.serve(socket, filter)?;
    tracing::info!(socket = ?socket, "vhost-user vsock backend: the VM disconnected");
    Ok(())
}

/// Serves a virtio-fs device sharing `shared_dir` on `socket` until the VM goes away. The tag
/// is for the log: QEMU's `vhost-user-fs-pci,tag=...` tells the guest.
pub fn serve_fs(socket: &Path, shared_dir: &Path, tag: &str, filter: Option<&crate::seccomp::Filter>) -> Result<(), VhostUserError> {
    let daemon = DeviceDaemon::new("hull-fs", FsDevice::new(shared_dir, tag)?, ConfigSpace::FromFrontend)?;
    tracing::info!(socket = ?socket, shared_dir = ?shared_dir, tag, "vhost-user fs backend listening");
    daemon.serve(socket, filter)?;
    tracing::info!(socket = ?socket, "vhost-user fs backend: the VM disconnected");
    Ok(())
}
