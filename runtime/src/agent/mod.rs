//! The host's side of the guest agent: a typed client of every call the runtime makes.

pub mod client;

pub use client::{ctx, ctx_unbounded, hybrid_vsock_connect, read_all, rpc_status, stdio, AgentConn, ClientError, RunOutput};
