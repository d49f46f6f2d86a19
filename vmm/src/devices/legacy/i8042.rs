//! The i8042 keyboard controller, for its one job in a microVM: command 0xFE on port 0x64
//! resets the CPU, which is how `reboot` ends the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::bus::{IoAction, PioDevice};

pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

#[derive(Clone, Default)]
pub struct ResetLine(Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

pub struct I8042 {
    device: I8042Device<ResetLine>,
    reset: ResetLine,
}

impl Default for I8042 {
    fn default() -> Self {
        let reset = ResetLine::default();
        I8042 { device: I8042Device::new(reset.clone()), reset }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(offset), [b]) = (u8::try_from(offset), data) {
            *b = self.device.read(offset);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoAction {
        if let (Ok(offset), [b]) = (u8::try_from(offset), data) {
            let _ = self.device.write(offset, *b);
        }
        if self.reset.0.swap(false, Ordering::SeqCst) { IoAction::Reset } else { IoAction::None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_pulls_the_reset_line_other_writes_do_not() {
        let mut i = I8042::default();
        assert_eq!(i.write(0, &[0xfe]), IoAction::None, "data port");
        assert_eq!(i.write(4, &[0x20]), IoAction::None, "another command");
        assert_eq!(i.write(4, &[0xfe]), IoAction::Reset);
    }
}
