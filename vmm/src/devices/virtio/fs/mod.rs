//! virtio-fs: one host directory shared with the guest under a tag, served by an in-process
//! FUSE passthrough server (fuse-backend-rs). The device knows nothing of its transport; the
//! vhost-user backend (`vhost_user::serve_fs`) and the in-process VMM drive the same `FsDevice`.

mod device;
#[cfg(test)]
mod tests;

pub use device::FsDevice;

/// Queue 0 is the high-priority queue (FORGET, INTERRUPT); queue 1 the one request queue.
pub const HIPRIO_QUEUE: usize = 0;
pub const REQUEST_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 1024;
/// The tag field of the config space is 36 bytes, not necessarily NUL-terminated.
pub const TAG_LEN: usize = 36;

/// The config space of a device sharing under `tag`: the tag (NUL-padded to 36 bytes), then
/// num_request_queues (LE u32). Whoever serves the queues, the guest reads this.
pub fn config_space(tag: &str) -> Result<[u8; TAG_LEN + 4], FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(FsError::Tag(tag.into()));
    }
    let mut c = [0u8; TAG_LEN + 4];
    c[..tag.len()].copy_from_slice(tag.as_bytes());
    c[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    Ok(c)
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("The shared directory {0:?} does not exist or is not a directory.")]
    SharedDir(std::path::PathBuf),
    #[error("The virtio-fs tag {0:?} must be 1 to 36 bytes.")]
    Tag(String),
    #[error("Cannot set up the FUSE passthrough of {dir:?}: {source}.")]
    Passthrough { dir: std::path::PathBuf, source: std::io::Error },
    /// A request whose descriptor chain cannot be read or written as a FUSE message.
    #[error(transparent)]
    Chain(#[from] fuse_backend_rs::transport::Error),
    /// A request the FUSE server could not decode or answer.
    #[error(transparent)]
    Request(#[from] fuse_backend_rs::Error),
}
