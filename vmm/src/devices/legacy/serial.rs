//! COM1: vm-superio's 16550A, its interrupt an eventfd KVM injects as IRQ 4 (irqfd), its
//! output any writer (a file, stdout).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
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

/// The UART's registers and unread input, as a snapshot keeps them (vm-superio's
/// `SerialState` has no serde): a guest driver that enabled interrupts expects them still on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SavedSerial {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialConsole {
        SerialConsole { serial: Serial::new(IrqTrigger(irq), out) }
    }

    /// A console whose UART is the saved one; refused if the saved input overflows its FIFO.
    pub fn restored(irq: EventFd, out: Box<dyn Write + Send>, saved: &SavedSerial) -> Result<SerialConsole, vm_superio::serial::Error<std::io::Error>> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out).map(|serial| SerialConsole { serial })
    }

    pub fn save(&self) -> SavedSerial {
        let s = self.serial.state();
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
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
