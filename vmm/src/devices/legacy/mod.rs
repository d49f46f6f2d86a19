//! Legacy port-I/O devices of a PC the guest kernel expects: the COM1 serial console and the
//! i8042 controller (whose reset line is how a guest reboots).
//! The device logic is vm-superio's; these are its wirings to the port bus.

pub mod bus;
pub mod i8042;
pub mod serial;

pub use bus::{IoAction, PioBus, PioDevice};
