//! Emulated devices.

pub mod legacy;
pub mod virtio;
