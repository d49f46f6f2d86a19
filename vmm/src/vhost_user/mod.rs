//! hull's devices as vhost-user backends, for QEMU (`vhost-user-vsock-pci`, `vhost-user-fs-pci`): the same
//! device logic the in-process VMM uses, behind the vhost-user protocol.

pub mod fs;
pub mod vsock;

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
