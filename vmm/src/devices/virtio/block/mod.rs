//! virtio-blk backed by a raw file: read-only or read-write, with flush and a device id.

mod device;
#[cfg(test)]
mod tests;

pub use device::BlockDevice;

pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// The id string GET_ID returns is at most 20 bytes.
pub const ID_LEN: usize = 20;

pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

pub const REQ_IN: u32 = 0;
pub const REQ_OUT: u32 = 1;
pub const REQ_FLUSH: u32 = 4;
pub const REQ_GET_ID: u32 = 8;

pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Cannot open the disk image {path:?}: {source}.")]
    Open { path: std::path::PathBuf, source: std::io::Error },
    #[error("The block device id {0:?} is longer than 20 bytes.")]
    Id(String),
}
