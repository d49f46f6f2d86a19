//! virtio-blk backed by a raw file: read-only or read-write, with flush and a device id.

mod device;
#[cfg(test)]
mod tests;

pub use device::BlockDevice;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
// Request types (the header's first u32), as virtio_bindings names them.
pub use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// The id string GET_ID returns is at most 20 bytes.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Feature masks of virtio_bindings' feature bits.
pub const F_RO: u64 = 1 << VIRTIO_BLK_F_RO;
pub const F_FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;

/// The status byte ending each request: virtio_bindings' VIRTIO_BLK_S_* as the byte it is.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Cannot open the disk image {path:?}: {source}.")]
    Open { path: std::path::PathBuf, source: std::io::Error },
    #[error("The block device id {0:?} is longer than 20 bytes.")]
    Id(String),
}
