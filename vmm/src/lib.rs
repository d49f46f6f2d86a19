//! hull-vmm: hull's KVM microVM monitor and its virtio devices.
//!
//! `arch/` lays out what the guest expects before its first instruction, `vstate/` holds the
//! KVM VM and vCPUs, `builder` puts a VM together and runs it. Device logic lives in
//! `devices/` and knows nothing of how it is wired: the same vsock device serves the
//! in-process VMM and, as a vhost-user backend, QEMU.

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod fuzzing;
pub mod seccomp;
pub mod vhost_user;
pub mod vstate;
