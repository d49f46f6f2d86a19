//! Emulated devices.

pub mod bus;
pub mod legacy;
pub mod mmio_bus;
pub mod virtio;

pub use mmio_bus::MmioBus;
