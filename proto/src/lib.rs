//! hull's agent API: the messages and ttrpc services generated from `protos/`, and the header
//! of the per-stream stdio connections.

#![allow(clippy::all)]

/// Generated protobuf messages and ttrpc services.
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
}

pub use generated::{agent, agent_ttrpc, health, health_ttrpc};

pub mod stdio;

/// Bumped on incompatible changes to the API or the stdio header.
pub const API_VERSION: u32 = 1;

/// The vsock port the agent serves ttrpc on inside a guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The vsock port of the agent's stdio stream listener inside a guest.
pub const STDIO_VSOCK_PORT: u32 = 1025;

/// The stdio listener path that goes with an agent unix socket path.
pub fn stdio_socket_path(agent_socket: &std::path::Path) -> std::path::PathBuf {
    let mut s = agent_socket.as_os_str().to_owned();
    s.push(".stdio");
    s.into()
}
