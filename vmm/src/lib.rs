//! hull-vmm: hull's KVM microVM monitor and its virtio devices.
//!
//! `config` says what a VM is made of; `builder` puts one together from it (`arch/` lays out
//! what the guest expects before its first instruction, `vstate/` holds the KVM VM and vCPUs,
//! `device_manager` wires the devices) and hands back a `running_vm::RunningVm`, which `api`
//! controls; `snapshot` saves a paused VM and is what `builder` restores one from. Device logic lives in `devices/` and knows nothing of how it is wired: the same
//! devices serve the in-process VMM and, through `vhost_user`'s one generic backend, QEMU.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod fuzzing;
pub mod jail;
pub mod log_limit;
pub mod running_vm;
pub mod seccomp;
pub mod snapshot;
#[cfg(test)]
mod test_sink;
pub mod vhost_user;
pub mod vstate;
