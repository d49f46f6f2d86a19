//! virtio-net backed by a tap device. The tap carries the 12-byte virtio-net header itself
//! (IFF_VNET_HDR, TUNSETVNETHDRSZ 12), so frames pass between the queues and the tap without
//! being reassembled. No offloads are offered: what the guest sends is what the wire gets.

mod device;
mod tap;
#[cfg(test)]
mod tests;

pub use device::NetDevice;
pub use tap::Tap;

use virtio_bindings::virtio_net::{virtio_net_hdr_v1, VIRTIO_NET_F_MAC};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// virtio_net_hdr_v1 (12 bytes): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
/// The largest frame without GSO: a 64 KiB IP packet plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65562;

/// The feature mask of virtio_bindings' VIRTIO_NET_F_MAC bit: the config space has the MAC.
pub const F_MAC: u64 = 1 << VIRTIO_NET_F_MAC;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Cannot open the tap {name:?}: {source}.")]
    Open { name: String, source: std::io::Error },
    #[error("Cannot configure the tap: {0}.")]
    Configure(#[source] std::io::Error),
    #[error(transparent)]
    Mac(#[from] hull_proto::mac::MacError),
}

/// Parses "aa:bb:cc:dd:ee:ff" (`hull_proto::mac`, the form the runtime writes).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    Ok(s.parse::<hull_proto::mac::Mac>()?.0)
}
