//! The MMIO bus: which device answers which guest-physical addresses in the MMIO gap. An
//! address no device claims reads as all ones and ignores writes, as the port bus does.

use std::sync::{Arc, Mutex};

use crate::devices::virtio::MmioTransport;

#[derive(Debug, thiserror::Error)]
pub enum MmioBusError {
    #[error("MMIO range {base:#x}+{len:#x} overlaps a device already on the bus.")]
    Overlap { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<MmioTransport>>,
}

#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<Range>,
}

impl MmioBus {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<MmioTransport>>) -> Result<(), MmioBusError> {
        let end = base.checked_add(len).ok_or(MmioBusError::Overlap { base, len })?;
        if self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(MmioBusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        self.ranges.iter().find(|r| addr >= r.base && addr - r.base < r.len).map(|r| (r, addr - r.base))
    }

    /// Whether a device claimed the address (unclaimed reads give 0xff bytes).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                r.device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                r.device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}
