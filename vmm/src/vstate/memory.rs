//! Guest memory: anonymous private mappings laid out by the architecture.

use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Cannot map {mib} MiB of guest memory: {reason}.")]
    Map { mib: u64, reason: String },
}

pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = crate::arch::x86_64::memory_regions(mib << 20);
    GuestMemoryMmap::from_ranges(&regions).map_err(|e| MemoryError::Map { mib, reason: e.to_string() })
}
