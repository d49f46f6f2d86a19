//! Only the host talks to the agent. The agent's API, stdio and port-forward ports accept vsock connections
//! whose peer is the host (CID 2) and drop every other one with a counted log line.
//!
//! The guest kernel has no vsock loopback transport (the image build fails if it has), so no
//! process in the guest can open a connection to a guest port at all: a container dialling CID
//! 1, its own CID or ANY is refused by the kernel. This check is the agent's own, so that the
//! boundary does not rest on one kernel option.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{getpeername, VsockAddr};
use ttrpc::{AcceptHook, HookError, HookOutput};

/// The host's CID, the only peer the agent answers.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// Connections dropped since boot; logged at 1, 2, 4, 8, ... so a flood cannot fill the log.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Whether a connection from `cid` may reach the agent; logs (counted) when it may not.
pub fn admit(cid: u32, port: &str) -> bool {
    if cid == HOST_CID {
        return true;
    }
    let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(peer_cid = cid, port, refused_so_far = n, "connection from a peer other than the host dropped");
    }
    false
}

/// ttrpc's accept hook for the API port.
#[derive(Debug)]
pub struct HostOnly;

impl AcceptHook for HostOnly {
    fn on_accept(&self, fd: RawFd) -> Result<HookOutput, HookError> {
        let peer = getpeername::<VsockAddr>(fd).map_err(|e| HookError::Io(e.into()))?;
        if admit(peer.cid(), "api") {
            Ok(HookOutput { data: Default::default(), payload_transform: None })
        } else {
            Err(HookError::Rejected(format!("peer CID {} is not the host", peer.cid())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_admitted() {
        assert!(admit(2, "api"));
        for cid in [0, 1, 3, 4, libc::VMADDR_CID_ANY] {
            assert!(!admit(cid, "api"), "CID {cid}");
        }
    }
}
