//! The slow suites on this machine's real /dev/kvm, in one test binary so that they run side
//! by side (each keeps one host core busy; where /dev/kvm is kvm_pvm every guest kernel
//! instruction is emulated and a boot takes minutes):
//! - `probe`: hull-vmm with hull's kernel and a static probe /init using every virtio-mmio
//!   device;
//! - `pod`: a pod on the builtin hypervisor through containerd and the shim.

mod pod;
mod probe;
