//! hull's runtime side: the client of the in-guest agent, default OCI documents, and (in later
//! increments) the containerd shim v2.

pub mod agent_client;
pub mod config;
pub mod image;
pub mod network;
pub mod shim;
pub mod oci;
pub mod vm;
