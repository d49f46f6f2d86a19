//! virtio devices, independent of their transport (virtio-mmio in process, or vhost-user).

pub mod fs;
pub mod vsock;

#[cfg(test)]
pub mod test_driver;
