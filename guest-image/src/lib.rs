//! Build tooling for hull's guest kernel and initramfs. Not built yet.
