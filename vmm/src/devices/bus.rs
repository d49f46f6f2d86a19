//! An address bus: which device answers which addresses. The same bus serves port I/O (the
//! legacy devices) and MMIO (virtio-mmio transports); an address no device claims reads as all
//! ones and ignores writes, as on a PC with nothing plugged in there (guests probe many).

use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
#[error("{space} {base:#x}+{len:#x} overlaps a device already on the bus.")]
pub struct BusError {
    pub space: &'static str,
    pub base: u64,
    pub len: u64,
}

struct Range<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

pub struct Bus<D: ?Sized> {
    /// "Ports" or "MMIO range", for errors.
    space: &'static str,
    ranges: Vec<Range<D>>,
}

impl<D: ?Sized> Bus<D> {
    pub fn new(space: &'static str) -> Bus<D> {
        Bus { space, ranges: Vec::new() }
    }

    /// Puts `device` at `base..base+len`, which no other device may overlap.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let overlap = || BusError { space: self.space, base, len };
        let end = base.checked_add(len).ok_or_else(overlap)?;
        if self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(overlap());
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    /// Every device on the bus, in the order they were put on it.
    pub fn devices(&self) -> impl Iterator<Item = &Arc<Mutex<D>>> {
        self.ranges.iter().map(|r| &r.device)
    }

    /// The device that claims `addr`, locked, and the offset of `addr` in its range.
    pub fn device(&self, addr: u64) -> Option<(MutexGuard<'_, D>, u64)> {
        let r = self.ranges.iter().find(|r| addr >= r.base && addr - r.base < r.len)?;
        Some((r.device.lock().unwrap_or_else(|e| e.into_inner()), addr - r.base))
    }

    /// Reads through `read` from the device claiming `addr`; says whether one did (unclaimed
    /// reads give 0xff bytes).
    pub fn read_with(&self, addr: u64, data: &mut [u8], read: impl FnOnce(&mut D, u64, &mut [u8])) -> bool {
        match self.device(addr) {
            Some((mut d, offset)) => {
                read(&mut d, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }
}
