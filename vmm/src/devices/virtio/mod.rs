//! virtio devices, independent of their transport (virtio-mmio in process, or vhost-user).

pub mod balloon;
pub mod block;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod pmem;
pub mod rng;
pub mod vsock;
pub mod worker;

#[cfg(test)]
pub mod test_driver;
#[cfg(test)]
mod mmio_tests;

pub use device::{DeviceEvent, InterruptLine, VirtioDevice};
pub use mmio::MmioTransport;
