//! The port-I/O bus: which legacy device answers which ports.

use crate::devices::bus::Bus;

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

pub type PioBus = Bus<dyn PioDevice>;

impl Default for PioBus {
    fn default() -> PioBus {
        Bus::new("Ports")
    }
}

impl PioBus {
    /// Whether a device claimed the port (unclaimed reads give 0xff bytes).
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        self.read_with(port.into(), data, |d, offset, data| d.read(offset as u16, data))
    }

    /// The device's answer, or None when no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<IoAction> {
        let (mut d, offset) = self.device(port.into())?;
        Some(d.write(offset as u16, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusError;
    use std::sync::{Arc, Mutex};

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
        assert!(matches!(bus.insert(0x3ff, 2, dev.clone()), Err(BusError { base: 0x3ff, len: 2, .. })));
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
