//! The MMIO bus: which virtio-mmio transport answers which guest-physical addresses in the
//! MMIO gap.

use super::bus::Bus;
use crate::devices::virtio::MmioTransport;

pub type MmioBus = Bus<MmioTransport>;

impl Default for MmioBus {
    fn default() -> MmioBus {
        Bus::new("MMIO range")
    }
}

impl MmioBus {
    /// Whether a device claimed the address (unclaimed reads give 0xff bytes).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.read_with(addr, data, |d, offset, data| d.read(offset, data))
    }

    /// Whether a device claimed the address (unclaimed writes are ignored).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.device(addr).map(|(mut d, offset)| d.write(offset, data)).is_some()
    }
}
