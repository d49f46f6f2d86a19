//! hull's runtime side: the containerd shim v2 and the `hull` CLI share everything here.
//!
//! - `host`: what this host offers (KVM kind); one answer for `hull check` and `auto`.
//! - `hypervisor`: one trait, one file per hypervisor (QEMU, the builtin hull-vmm).
//! - `pod`: a pod's lifecycle (boot, share, network, destroy) and its state directory.
//! - `agent`: the typed client of the guest agent.
//! - `shim`: containerd's task API over pods.
//! - `config`, `oci` (default OCI documents), `image` (OCI image tarballs for `hull run`).

pub mod agent;
pub mod config;
pub mod host;
pub mod hypervisor;
pub mod image;
pub mod oci;
pub mod pod;
pub mod shim;
