//! hull's devices as vhost-user backends, for QEMU (`vhost-user-vsock-pci`, `vhost-user-fs-pci`): the same
//! device logic the in-process VMM uses, behind the vhost-user protocol.

pub mod fs;
pub mod vsock;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// The virtio features every hull backend offers: virtio 1.0, and vhost-user protocol features
/// (EVENT_IDX is not offered: every used buffer is signalled).
pub const BASE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The event that stops a backend's worker thread, handed to the daemon per thread.
pub struct ExitEvent(EventConsumer, EventNotifier);

impl ExitEvent {
    pub fn new() -> Result<ExitEvent, VhostUserError> {
        let (c, n) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(|e| VhostUserError::Daemon(e.to_string()))?;
        Ok(ExitEvent(c, n))
    }

    /// What `VhostUserBackend::exit_event` returns.
    pub fn pair(&self) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.0.try_clone().ok()?, self.1.try_clone().ok()?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error("Cannot create the vhost-user daemon: {0}.")]
    Daemon(String),
    #[error("Cannot watch the device's host sockets: {0}.")]
    Register(#[source] std::io::Error),
    #[error("The vhost-user connection on {socket:?} failed: {reason}.")]
    Serve { socket: std::path::PathBuf, reason: String },
}
