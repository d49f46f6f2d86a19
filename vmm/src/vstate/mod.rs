//! KVM state: the VM (guest memory, irqchip, PIT) and its vCPUs.

pub mod control;
pub mod memory;
pub mod vcpu;
pub mod vm;
