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

/// A file read into guest memory nothing has written yet (a new memfd reads as zeros), that
/// leaves out the pieces of it that are all zeros: the page-aligned padding between a
/// kernel's segments and the zero pages of its data are then never written, so the host never
/// backs them (about 3 MiB of a 15 MiB vmlinux). Each piece ends at a guest page boundary, so
/// a zero page of the file is a page of guest memory left untouched.
pub struct IntoFreshMemory<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R> IntoFreshMemory<R> {
    pub fn new(inner: R) -> Self {
        IntoFreshMemory { inner, buf: vec![0; 64 << 10] }
    }
}

const PAGE: usize = 4096;

impl<R: std::io::Read> vm_memory::ReadVolatile for IntoFreshMemory<R> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        dst: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        // Fills `dst` whole unless the file ends: guest memory's read_volatile_from calls this
        // once per region and takes a short count as a short file.
        let mut done = 0;
        while done < dst.len() {
            let want = (dst.len() - done).min(self.buf.len());
            let n = match self.inner.read(&mut self.buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(vm_memory::VolatileMemoryError::IOError(e)),
            };
            let host = dst.ptr_guard().as_ptr() as usize + done;
            let mut at = 0;
            while at < n {
                let end = (((host + at) / PAGE + 1) * PAGE - host).min(n);
                let piece = &self.buf[at..end];
                if piece.iter().any(|&b| b != 0) {
                    dst.subslice(done + at, piece.len())?.copy_from(piece);
                }
                at = end;
            }
            done += n;
        }
        Ok(done)
    }
}

// The loaders read the headers and seek through these; only segment bytes go through
// read_volatile.
impl<R: std::io::Read> std::io::Read for IntoFreshMemory<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: std::io::Seek> std::io::Seek for IntoFreshMemory<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Pages of the memfd behind `mem` (one region, from guest address 0) within `range` that
/// exist: SEEK_DATA on a shmem file finds only pages that were written (or read through a
/// shared mapping) and not punched out.
#[cfg(test)]
pub fn backed_pages(mem: &GuestMemoryMmap, range: std::ops::Range<usize>) -> usize {
    use vm_memory::GuestMemory;
    let region = mem.iter().next().expect("a region");
    let fd = std::os::fd::AsRawFd::as_raw_fd(region.file_offset().expect("memfd").file());
    (range.start / PAGE..range.end.div_ceil(PAGE))
        .filter(|p| {
            // SAFETY: lseek on a descriptor `mem` owns; no memory is passed.
            let found = unsafe { libc::lseek(fd, (p * PAGE) as i64, libc::SEEK_DATA) };
            found == (p * PAGE) as i64
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn zero_pages_of_the_file_leave_guest_pages_unbacked() {
        let mem = create(2).expect("memory");
        // Larger than the reader's buffer, and not a whole number of pages: data in pages 0,
        // 17 (its last byte only) and 40 (its first byte only), zeros elsewhere.
        let mut file = vec![0u8; 60 * PAGE + 100];
        file[..PAGE].fill(0xaa);
        file[18 * PAGE - 1] = 7;
        file[40 * PAGE] = 9;
        let at = GuestAddress(0x10000);
        mem.read_exact_volatile_from(at, &mut IntoFreshMemory::new(&file[..]), file.len()).expect("load");
        // Counted before reading back: a read of a shared memfd's hole backs the page too.
        assert_eq!(backed_pages(&mem, 0..2 << 20), 3, "only the three pages with data are backed");
        let mut back = vec![1u8; file.len()];
        mem.read_slice(&mut back, at).expect("read back");
        assert_eq!(back, file, "the guest sees the whole file");
    }
}
