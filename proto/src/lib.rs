//! What both sides of hull's VM boundary agree on: the agent API (the messages and ttrpc
//! services generated from `protos/`), the header of the per-stream stdio connections, and the
//! hybrid vsock handshake, the kind of tap a NIC uses; plus containerd's runtime options message
//! the shim reads, and the rtnetlink requests with which the shim reads a pod's network and the
//! agent applies it.

#![allow(clippy::all)]

/// Generated protobuf messages and ttrpc services.
#[cfg(feature = "api")]
#[allow(unknown_lints, clippy::all, dead_code, unused_imports, unused_results, unused_mut, missing_docs, nonstandard_style)]
pub mod generated {
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
    pub mod health {
        include!(concat!(env!("OUT_DIR"), "/health.rs"));
    }
    pub mod health_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
    }
    /// containerd's `runtimeoptions.v1.Options` (the `options` of a runtime handler).
    pub mod runtimeoptions {
        include!(concat!(env!("OUT_DIR"), "/runtimeoptions.rs"));
    }
}

#[cfg(feature = "api")]
pub use generated::{agent, agent_ttrpc, health, health_ttrpc, runtimeoptions};

pub mod forward;
pub mod host_socket;
pub mod hvsock;
pub mod mac;
pub mod netlink;
pub mod stdio;
pub mod tap;

/// Bumped on incompatible changes to the API or the stdio header.
pub const API_VERSION: u32 = 1;

/// The vsock port the agent serves ttrpc on inside a guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The vsock port of the agent's stdio stream listener inside a guest.
pub const STDIO_VSOCK_PORT: u32 = 1025;
/// The vsock port of the agent's port-forward listener inside a guest (see [`forward`]).
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// The stdio listener path that goes with an agent unix socket path.
pub fn stdio_socket_path(agent_socket: &std::path::Path) -> std::path::PathBuf {
    let mut s = agent_socket.as_os_str().to_owned();
    s.push(".stdio");
    s.into()
}

/// The port-forward listener path that goes with an agent unix socket path.
pub fn forward_socket_path(agent_socket: &std::path::Path) -> std::path::PathBuf {
    let mut s = agent_socket.as_os_str().to_owned();
    s.push(".forward");
    s.into()
}
