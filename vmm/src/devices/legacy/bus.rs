//! The port-I/O bus: which device answers which ports. A port no device claims reads as all
//! ones and ignores writes, as on a PC with nothing plugged in there; guests probe many.

use std::sync::{Arc, Mutex};

/// What a port write asks of the VMM beyond the device's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    None,
    /// The guest pulled the reset line: the VM ends.
    Reset,
}

pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> IoAction;
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("Ports {base:#x}..{end:#x} overlap a device already on the bus.")]
    Overlap { base: u16, end: u32 },
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if self.ranges.iter().any(|r| u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end) {
            return Err(BusError::Overlap { base, end });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges.iter().find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len)).map(|r| (r, port - r.base))
    }

    /// Whether a device claimed the port (unclaimed reads give 0xff bytes).
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// The device's answer, or None when no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<IoAction> {
        let (r, offset) = self.find(port)?;
        Some(r.device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u16, u8)>);
    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) -> IoAction {
            self.0.push((offset, data[0]));
            if data[0] == 0xfe { IoAction::Reset } else { IoAction::None }
        }
    }

    #[test]
    fn ports_route_by_range_and_unclaimed_ports_float() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        assert!(matches!(bus.insert(0x3ff, 2, dev.clone()), Err(BusError::Overlap { .. })));
        bus.insert(0x400, 1, dev.clone()).expect("adjacent range");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(bus.write(0x3f9, &[7]), Some(IoAction::None));
        assert_eq!(bus.write(0x3f8, &[0xfe]), Some(IoAction::Reset));
        assert_eq!(bus.write(0x80, &[1]), None);
        assert_eq!(dev.lock().unwrap().0, vec![(1, 7), (0, 0xfe)]);
    }
}
