//! virtio-pmem over a read-only file: the guest's root image, mapped into guest physical memory
//! above RAM and read there in place (the guest's DAX), so nothing of it is copied into guest
//! RAM and every VM maps the same page-cache pages of the file.
//!
//! The file is opened read-only and mapped PROT_READ, and KVM gets the mapping as a read-only
//! slot: a guest write to it exits to the VMM as MMIO nothing answers, and cannot reach the
//! file or the page cache. The one request a driver sends, FLUSH, has nothing to flush.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_ids::VIRTIO_ID_PMEM;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

use super::device::{read_config_bytes, DeviceEvent, VirtioDevice};

pub const QUEUE_SIZE: u16 = 32;
/// The guest maps the region as device memory in subsections of this size.
pub const ALIGN: u64 = 2 << 20;
const REQ_TYPE_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;
const MAX_DESCRIPTORS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("Cannot open the pmem image {path:?}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("The pmem image {path:?} is not a regular file.")]
    NotAFile { path: PathBuf },
    #[error("The pmem image {path:?} is {bytes} bytes, not a whole number of 2 MiB pages.")]
    Size { path: PathBuf, bytes: u64 },
    #[error("Cannot map the pmem image {path:?}: {source}")]
    Map { path: PathBuf, source: std::io::Error },
}

/// The image's read-only shared mapping; unmapped when dropped.
pub struct ImageMapping {
    host: *mut libc::c_void,
    len: u64,
    _file: File,
}

// SAFETY: the mapping is read-only and never written through this pointer; it is only handed
// to KVM as an address and unmapped once, in Drop.
unsafe impl Send for ImageMapping {}

impl ImageMapping {
    pub fn open(path: &Path) -> Result<ImageMapping, PmemError> {
        let file = File::open(path).map_err(|source| PmemError::Open { path: path.into(), source })?;
        let meta = file.metadata().map_err(|source| PmemError::Open { path: path.into(), source })?;
        let len = meta.len();
        if !meta.is_file() {
            return Err(PmemError::NotAFile { path: path.into() });
        }
        if len == 0 || len % ALIGN != 0 {
            return Err(PmemError::Size { path: path.into(), bytes: len });
        }
        // SAFETY: a new mapping of `len` bytes of a file we hold open; no existing memory is
        // touched. PROT_READ of an O_RDONLY fd: nothing can write the file through it.
        let host = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_NORESERVE, file.as_raw_fd(), 0) };
        if host == libc::MAP_FAILED {
            return Err(PmemError::Map { path: path.into(), source: std::io::Error::last_os_error() });
        }
        Ok(ImageMapping { host, len, _file: file })
    }

    pub fn host_address(&self) -> u64 {
        self.host as u64
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for ImageMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `open` made, unmapped once.
        unsafe { libc::munmap(self.host, self.len as usize) };
    }
}

/// The device: where the image sits in guest physical memory, and its mapping kept for as long
/// as the device (and so the VM) lives.
pub struct PmemDevice {
    start: u64,
    mapping: ImageMapping,
    /// Requests answered with an error (malformed, or of a type this device does not know).
    pub rejected: u64,
}

impl PmemDevice {
    pub fn new(start: u64, mapping: ImageMapping) -> PmemDevice {
        PmemDevice { start, mapping, rejected: 0 }
    }

    /// virtio_pmem_config: start and size, little-endian.
    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.start.to_le_bytes());
        c[8..].copy_from_slice(&self.mapping.len().to_le_bytes());
        c
    }

    pub fn process_queue<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // A request is one readable le32 (its type) and a writable le32 for the answer.
            // A well-formed request has two descriptors; more are looked at no further.
            let descs: Vec<_> = chain.take(MAX_DESCRIPTORS).collect();
            let req = descs.iter().find(|d| !d.is_write_only() && d.len() >= 4);
            let resp = descs.iter().find(|d| d.is_write_only() && d.len() >= 4);
            let mut written = 0;
            if let Some(resp) = resp {
                let kind = req.and_then(|d| mem.read_obj::<u32>(d.addr()).ok()).map(u32::from_le);
                let answer = if kind == Some(REQ_TYPE_FLUSH) {
                    RESP_OK
                } else {
                    self.rejected += 1;
                    RESP_EIO
                };
                if mem.write_obj(answer.to_le(), resp.addr()).is_ok() {
                    written = 4;
                }
            } else {
                self.rejected += 1;
            }
            if queue.add_used(mem, head, written).is_err() {
                return used;
            }
            used = true;
        }
        if self.rejected > 0 && used {
            tracing::debug!(rejected = self.rejected, "virtio-pmem: requests refused so far");
        }
        used
    }
}

impl VirtioDevice for PmemDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn process(&mut self, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match (event, queues.first_mut()) {
            (DeviceEvent::Queue(0), Some(q)) => self.process_queue(q, mem),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::TestDriver;

    fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        (dir, path)
    }

    #[test]
    fn config_space_is_where_the_image_sits_and_its_size() {
        let (_d, path) = image(4 << 20);
        let dev = PmemDevice::new(0x1_4000_0000, ImageMapping::open(&path).unwrap());
        let mut c = [0u8; 16];
        dev.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 0x1_4000_0000);
        assert_eq!(u64::from_le_bytes(c[8..].try_into().unwrap()), 4 << 20);
    }

    #[test]
    fn an_image_of_no_whole_2mib_pages_is_refused() {
        let (_d, path) = image((2 << 20) + 4096);
        assert!(matches!(ImageMapping::open(&path), Err(PmemError::Size { .. })));
        let (_d, path) = image(0);
        assert!(matches!(ImageMapping::open(&path), Err(PmemError::Size { .. })));
    }

    #[test]
    fn flush_succeeds_and_anything_else_is_an_error() {
        let (_d, path) = image(2 << 20);
        let mut dev = PmemDevice::new(1 << 32, ImageMapping::open(&path).unwrap());
        let mut d = TestDriver::new();
        let mut q = d.queue(0x10000);
        let (req, resp) = (d.buffer(&REQ_TYPE_FLUSH.to_le_bytes(), 4), d.buffer(&[0xff; 4], 4));
        let h1 = d.post(&mut q, &[(req, 4, false), (resp, 4, true)]);
        let (bad, bad_resp) = (d.buffer(&7u32.to_le_bytes(), 4), d.buffer(&[0xff; 4], 4));
        let h2 = d.post(&mut q, &[(bad, 4, false), (bad_resp, 4, true)]);
        let lone = d.buffer(&REQ_TYPE_FLUSH.to_le_bytes(), 4);
        let h3 = d.post(&mut q, &[(lone, 4, false)]);
        assert!(dev.process_queue(&mut q.queue, &d.mem));
        assert_eq!(d.take_used(&mut q), vec![(h1, 4), (h2, 4), (h3, 0)]);
        assert_eq!(d.read(resp, 4), RESP_OK.to_le_bytes());
        assert_eq!(d.read(bad_resp, 4), RESP_EIO.to_le_bytes());
        assert_eq!(dev.rejected, 2);
    }
}
