//! virtio-vsock with a hybrid host side: the host end of every connection is a unix socket.
//!
//! - A host process connects to the device's unix socket `uds`, writes `CONNECT <port>\n`, gets
//!   `OK <hostport>\n`, and then has a byte stream to guest port `<port>` (Firecracker's
//!   protocol; `connect` in any case is accepted). Both ends of that handshake are
//!   `hull_proto::hvsock`, shared with the runtime that writes it.
//! - A guest connection to CID 2 port P is forwarded to the unix socket `<uds>_P`.
//!
//! Flow control is the virtio credit scheme: a connection never sends the guest more than the
//! guest said it can buffer, and never buffers more from the guest than it advertised, so one
//! stalled peer stalls only its own connection.

mod connection;
mod device;
mod muxer;

#[cfg(test)]
mod tests;

pub use device::VsockDevice;
pub use muxer::VsockMuxer;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;
pub const QUEUE_SIZE: u16 = 256;

/// Largest packet payload accepted from or sent to the guest.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// What each connection can buffer of guest data (advertised as buf_alloc).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Connections of one VM at most: each holds a host socket and up to CONN_BUF_ALLOC of guest
/// data, so this bounds what a guest opening connections costs the host (~256 MiB).
pub const MAX_CONNECTIONS: usize = 1024;
/// RSTs waiting for RX buffers at most: a guest sending packets to nowhere while never taking
/// the answers gets no more queued (an RST is an answer the guest may miss anyway).
pub const MAX_ORPHAN_RSTS: usize = 256;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("Cannot listen on the vsock unix socket {path:?}: {source}.")]
    Listen { path: std::path::PathBuf, source: std::io::Error },
    #[error("Cannot set up the vsock device's epoll: {0}.")]
    Epoll(#[source] std::io::Error),
}
