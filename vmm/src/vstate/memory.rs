//! Guest memory: anonymous private mappings laid out by the architecture.

use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Cannot map {mib} MiB of guest memory: {source}.")]
    Map { mib: u64, source: vm_memory::mmap::FromRangesError },
}

pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = crate::arch::x86_64::memory_regions(mib << 20);
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Map { mib, source })
}
