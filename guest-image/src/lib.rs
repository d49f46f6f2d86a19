//! Build tooling for hull's guest: the kernel (Debian's linux-source-6.1 with a microVM config
//! fragment and patches) and the initramfs whose /init is hull-agent.

pub mod build;
pub mod cpio;
pub mod elf;
pub mod kconfig;
pub mod vmlinux;
