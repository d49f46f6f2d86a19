//! The suites that need a real KVM, in one test binary. Where this host has none (kvm_pvm),
//! each runs inside the L1 KVM host (`hull_tests::kvm_host`), one L1 VM at a time:
//! - `probe`: hull-vmm with hull's kernel, two vCPUs and a static probe /init using every
//!   virtio-mmio device;
//! - `pod`: pods on the builtin hypervisor through containerd and the shim, picked by `auto`;
//! - `cri`: a CRI pod of two containers on hull-vmm's virtio-net, and a runc pod it talks to;
//! - `snapshot`: hull-vmm saves a VM at agent ready and restores it twice, each with its own CID.

mod cri;
mod pod;
mod probe;
mod snapshot;
