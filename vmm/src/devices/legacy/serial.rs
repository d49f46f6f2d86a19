//! COM1: vm-superio's 16550A, its interrupt an eventfd KVM injects as IRQ 4 (irqfd), its
//! output any writer (a file, stdout).

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{IoAction, PioDevice};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the serial's interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialConsole {
        SerialConsole { serial: Serial::new(IrqTrigger(irq), out) }
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(offset), [b]) = (u8::try_from(offset), data) {
            *b = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoAction {
        if let (Ok(offset), [b]) = (u8::try_from(offset), data) {
            // A console whose sink fails must not stop the guest.
            if let Err(e) = self.serial.write(offset, *b) {
                tracing::debug!(error = ?e, "serial output");
            }
        }
        IoAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sink::Sink;

    #[test]
    fn bytes_written_to_thr_reach_the_sink_and_raise_the_irq_when_enabled() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com1 = SerialConsole::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        com1.write(1, &[0x02]); // IER: THR-empty interrupt on
        for b in b"hi" {
            com1.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
        assert!(irq.read().expect("interrupt raised") >= 1);
        let mut lsr = [0u8];
        com1.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}
