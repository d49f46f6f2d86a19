//! hull-vmm: hull's KVM microVM monitor and its virtio devices.
//!
//! Device logic lives in `devices/` and knows nothing of how it is wired: the same vsock
//! device serves the in-process VMM and, as a vhost-user backend, QEMU.

pub mod devices;
pub mod vhost_user;
