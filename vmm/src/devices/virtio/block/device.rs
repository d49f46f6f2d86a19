//! The block device's request processing, independent of its transport.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::device::{read_config_bytes, DeviceEvent, VirtioDevice};

/// Data moves between the file and guest memory through a buffer of this size, so a request of
/// any length costs no more host memory than this.
const CHUNK: usize = 64 * 1024;

pub struct BlockDevice {
    file: File,
    read_only: bool,
    /// Capacity in sectors (a trailing partial sector is not exposed).
    sectors: u64,
    id: String,
    /// Requests refused as malformed (no status byte, header unreadable).
    pub rejected: u64,
}

/// Why a request failed, reported to the guest as its status byte (UNSUPP for an unknown
/// request type, IOERR for the others) and logged.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("sector {sector} + {len} bytes is past the end of the disk ({sectors} sectors)")]
    PastEnd { sector: u64, len: usize, sectors: u64 },
    #[error("flush: {0}")]
    Flush(#[source] std::io::Error),
    #[error("read at {offset}: {source}")]
    DiskRead { offset: u64, source: std::io::Error },
    #[error("write at {offset}: {source}")]
    DiskWrite { offset: u64, source: std::io::Error },
    #[error("guest buffer: {0}")]
    GuestBuffer(#[source] std::io::Error),
    #[error("{0}")]
    IdBuffer(#[source] std::io::Error),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl BlockDevice {
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<BlockDevice, BlockError> {
        if id.len() > ID_LEN {
            return Err(BlockError::Id(id.into()));
        }
        let open_err = |source| BlockError::Open { path: path.into(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        Ok(BlockDevice { file, read_only, sectors: len / SECTOR_SIZE, id: id.into(), rejected: 0 })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves every request queued. Returns whether buffers were used.
    pub fn process_queue<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match self.serve(mem, chain) {
                Some(n) => n,
                None => {
                    self.rejected += 1;
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::error!(error = %e, "virtio-blk: cannot return a buffer");
                return used;
            }
            used = true;
        }
        used
    }

    /// One request: header (readable), data, status byte (the last writable byte). Returns the
    /// bytes written to the guest, or None when the chain is too malformed to carry a status.
    fn serve<M: GuestMemory>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> Option<u32> {
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-blk: request with an unreadable chain refused");
                return None;
            }
        };
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-blk: request with an unwritable chain refused");
                return None;
            }
        };
        let data_len = writer.available_bytes().checked_sub(1)?;
        let mut status_writer = writer.split_at(data_len).ok()?;
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            tracing::warn!("virtio-blk: request without a full header refused");
            let _ = status_writer.write_all(&[STATUS_IOERR]);
            return Some(1);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15]]);
        let result = match kind {
            VIRTIO_BLK_T_IN => self.read_to_guest(sector, data_len, &mut writer),
            VIRTIO_BLK_T_OUT if self.read_only => Err(RequestError::ReadOnly),
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                self.write_from_guest(sector, len, &mut reader)
            }
            VIRTIO_BLK_T_FLUSH => self.file.sync_all().map(|_| 0).map_err(RequestError::Flush),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                id[..self.id.len()].copy_from_slice(self.id.as_bytes());
                let n = writer.available_bytes().min(ID_LEN);
                writer.write_all(&id[..n]).map(|_| n).map_err(RequestError::IdBuffer)
            }
            other => Err(RequestError::Unsupported(other)),
        };
        let (status, written) = match result {
            Ok(n) => (STATUS_OK, n),
            Err(RequestError::Unsupported(kind)) => {
                tracing::debug!(request = kind, "virtio-blk: unsupported request type");
                (STATUS_UNSUPP, 0)
            }
            Err(why) => {
                tracing::warn!(request = kind, sector, %why, "virtio-blk: request failed");
                (STATUS_IOERR, writer.bytes_written())
            }
        };
        status_writer.write_all(&[status]).ok()?;
        Some(written as u32 + 1)
    }

    /// The byte offset of `sector` if `len` bytes from it lie within the disk.
    fn range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let offset = sector.checked_mul(SECTOR_SIZE);
        let end = offset.and_then(|o| o.checked_add(len as u64));
        match (offset, end) {
            (Some(o), Some(e)) if e <= self.sectors * SECTOR_SIZE => Ok(o),
            _ => Err(RequestError::PastEnd { sector, len, sectors: self.sectors }),
        }
    }

    /// Fills `len` bytes of the guest's buffers from the disk at `sector`.
    fn read_to_guest(&self, sector: u64, len: usize, out: &mut impl Write) -> Result<usize, RequestError> {
        let mut offset = self.range(sector, len)?;
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.file.read_exact_at(&mut buf[..n], offset).map_err(|source| RequestError::DiskRead { offset, source })?;
            out.write_all(&buf[..n]).map_err(RequestError::GuestBuffer)?;
            offset += n as u64;
            left -= n;
        }
        Ok(len)
    }

    /// Writes `len` bytes of the guest's buffers to the disk at `sector`.
    fn write_from_guest(&self, sector: u64, len: usize, input: &mut impl Read) -> Result<usize, RequestError> {
        let mut offset = self.range(sector, len)?;
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            input.read_exact(&mut buf[..n]).map_err(RequestError::GuestBuffer)?;
            self.file.write_all_at(&buf[..n], offset).map_err(|source| RequestError::DiskWrite { offset, source })?;
            offset += n as u64;
            left -= n;
        }
        Ok(0)
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    /// capacity (u64 sectors); nothing else is offered.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn process(&mut self, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match (event, queues.first_mut()) {
            (DeviceEvent::Queue(0), Some(q)) => self.process_queue(q, mem),
            _ => false,
        }
    }
}
