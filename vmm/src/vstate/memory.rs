//! Guest memory: one memfd, mapped shared, laid out by the architecture. A file rather than an
//! anonymous mapping so that another process can map the same memory: a vhost-user backend
//! (the jailed virtio-fs server) gets the memfd with SET_MEM_TABLE.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Cannot create the guest memory file of {mib} MiB: {source}.")]
    File { mib: u64, source: std::io::Error },
    #[error("Cannot map {mib} MiB of guest memory: {source}.")]
    Map { mib: u64, source: vm_memory::mmap::FromRangesError },
}

pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file_err = |source| MemoryError::File { mib, source };
    // Never executable (a host with vm.memfd_noexec=2 refuses memfds that could be); kernels
    // before 6.3 do not know the flag (EINVAL) and make none executable by exec anyway.
    let mut fd = -1;
    for flags in [libc::MFD_CLOEXEC | libc::MFD_NOEXEC_SEAL, libc::MFD_CLOEXEC] {
        // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new
        // descriptor (or -1), which the File below owns.
        fd = unsafe { libc::memfd_create(c"hull-guest-memory".as_ptr(), flags) };
        if fd >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    if fd < 0 {
        return Err(file_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mib << 20).map_err(file_err)?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (addr, len) in crate::arch::x86_64::memory_regions(mib << 20) {
        ranges.push((addr, len, Some(FileOffset::new(file.try_clone().map_err(file_err)?, offset))));
        offset += len as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|source| MemoryError::Map { mib, source })
}
