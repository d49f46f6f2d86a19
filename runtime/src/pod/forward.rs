//! `kubectl port-forward` into a pod VM.
//!
//! containerd's CRI forwards a port the way it does for runc pods: it enters the pod's network
//! namespace on the host and dials `localhost:PORT` (IPv4 first, then IPv6; containerd 1.6 and
//! 2.x alike). With hull nothing listens there: the pod's servers run in the guest, and the
//! namespace's loopback is the host's. So the shim listens on one loopback port of that
//! namespace, an iptables `REDIRECT` in its `nat OUTPUT` chain sends every TCP connection to
//! 127.0.0.0/8 there (no other process uses that loopback: the VMM runs in a network namespace of
//! its own, its jail's, and gets the tap as a descriptor), and for each connection the shim reads the port it was
//! meant for (`SO_ORIGINAL_DST`) and relays it over vsock to the agent, which dials that port on
//! the guest's loopback (`hull_proto::forward`). Every IPv4 dial succeeds at once, so
//! containerd never falls back to IPv6; the agent tries 127.0.0.1, then ::1.
//!
//! The rule sits in a chain of hull's own (`HULL-PORT-FORWARD`, jumped to from `OUTPUT`), made
//! afresh when the pod starts and removed with the pod's tap and filters; a connection whose
//! port nothing serves in the guest is closed at once (containerd reports the stream's end).
//! The host's own network namespace is refused: its loopback is not the pod's to take.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};

use super::network::{self, NetworkError};
use crate::agent::{AgentConn, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error(transparent)]
    Netns(#[from] NetworkError),
    #[error("Cannot tell whether {path:?} is the host's network namespace: {source}.")]
    Identify { path: PathBuf, source: std::io::Error },
    #[error("Cannot listen on the loopback of the pod network namespace: {0}.")]
    Listen(#[source] std::io::Error),
    #[error("Cannot run iptables to redirect loopback connections in the pod network namespace (port-forward needs it): {0}.")]
    Iptables(#[source] std::io::Error),
    #[error("iptables could not add the loopback redirect in the pod network namespace ({status}): {stderr}")]
    IptablesFailed { status: std::process::ExitStatus, stderr: String },
    #[error("The port-forward set-up did not finish: {0}.")]
    Thread(#[source] tokio::task::JoinError),
    #[error("The pod's network namespace {0:?} is the host's; hull does not redirect the host's loopback.")]
    HostNamespace(PathBuf),
}

/// hull's own nat chain in the pod's network namespace.
const CHAIN: &str = "HULL-PORT-FORWARD";
/// How long the agent may take to answer a forward: a guest that never answers does not hold
/// the relay's connections for ever.
const AGENT_REPLY: Duration = Duration::from_secs(10);

/// The shim's port-forward relay of one pod; it ends when dropped.
pub struct PortForwarder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PortForwarder {
    /// Listens in `netns`, installs the redirect and relays connections to the pod's agent.
    pub async fn start(sandbox_id: &str, netns: &Path, conn: Arc<AgentConn>) -> Result<PortForwarder, PortForwardError> {
        refuse_host_namespace(netns)?;
        let path = netns.to_path_buf();
        let listener = tokio::task::spawn_blocking(move || network::on_thread_in(&path, listen_here)).await.map_err(PortForwardError::Thread)???;
        let listener = TcpListener::from_std(listener).map_err(PortForwardError::Listen)?;
        let task = tokio::spawn(relay(listener, conn, sandbox_id.to_string()));
        Ok(PortForwarder { task })
    }
}

/// The host's own namespace is not the pod's: its loopback is not hull's to redirect.
fn refuse_host_namespace(netns: &Path) -> Result<(), PortForwardError> {
    let identify = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).map_err(|source| PortForwardError::Identify { path: path.into(), source });
    if identify(netns)? == identify(Path::new("/proc/self/ns/net"))? {
        return Err(PortForwardError::HostNamespace(netns.into()));
    }
    Ok(())
}

/// Listens on this thread's loopback and redirects it there (on a thread in the pod's namespace).
fn listen_here() -> Result<std::net::TcpListener, PortForwardError> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(PortForwardError::Listen)?;
    listener.set_nonblocking(true).map_err(PortForwardError::Listen)?;
    let port = listener.local_addr().map_err(PortForwardError::Listen)?.port().to_string();
    // The chain may be left from a pod that used this namespace before: made if missing, emptied.
    let _ = iptables(&["-N", CHAIN]);
    iptables(&["-F", CHAIN])?;
    iptables(&["-A", CHAIN, "-o", "lo", "-p", "tcp", "-d", "127.0.0.0/8", "-j", "REDIRECT", "--to-ports", &port])?;
    if iptables(&["-C", "OUTPUT", "-j", CHAIN]).is_err() {
        iptables(&["-A", "OUTPUT", "-j", CHAIN])?;
    }
    Ok(listener)
}

/// One iptables command on the nat table of this thread's network namespace (a child process
/// inherits the namespace of the thread that starts it).
fn iptables(args: &[&str]) -> Result<(), PortForwardError> {
    // -w: CNI plugins of other pods may hold the xtables lock for a moment.
    let out = Command::new("iptables").args(["-w", "10", "-t", "nat"]).args(args).output().map_err(PortForwardError::Iptables)?;
    if !out.status.success() {
        return Err(PortForwardError::IptablesFailed { status: out.status, stderr: String::from_utf8_lossy(&out.stderr).trim().into() });
    }
    Ok(())
}

/// Removes the redirect from `netns` (the pod's end; nothing if it was never made).
pub fn remove_redirect(netns: &Path) {
    let removed = network::on_thread_in(netns, || -> Result<(), PortForwardError> {
        if iptables(&["-C", "OUTPUT", "-j", CHAIN]).is_ok() {
            iptables(&["-D", "OUTPUT", "-j", CHAIN])?;
        }
        if iptables(&["-F", CHAIN]).is_ok() {
            iptables(&["-X", CHAIN])?;
        }
        Ok(())
    });
    match removed {
        Ok(Ok(())) => {}
        Err(NetworkError::Netns { .. }) => {} // the namespace is gone, and the rule with it
        Ok(Err(e)) => tracing::warn!(netns = ?netns, error = %e, "cannot remove the port-forward redirect"),
        Err(e) => tracing::warn!(netns = ?netns, error = %e, "cannot remove the port-forward redirect"),
    }
}

/// The port a redirected connection was dialled to.
fn original_port(client: &TcpStream) -> nix::Result<u16> {
    getsockopt(client, sockopt::OriginalDst).map(|dst| u16::from_be(dst.sin_port))
}

async fn relay(listener: TcpListener, conn: Arc<AgentConn>, sandbox_id: String) {
    loop {
        let (mut client, peer): (TcpStream, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely; do not spin.
                tracing::warn!(sandbox_id, error = %e, "port-forward accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let port = match original_port(&client) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sandbox_id, %peer, error = %e, "port-forward connection without an original destination");
                continue;
            }
        };
        let conn = conn.clone();
        let sandbox_id = sandbox_id.clone();
        tokio::spawn(async move {
            let opened = tokio::time::timeout(AGENT_REPLY, conn.forward(port)).await;
            match opened.unwrap_or_else(|_| Err(ClientError::Forward { port, source: std::io::ErrorKind::TimedOut.into() })) {
                Ok(mut guest) => {
                    tracing::info!(sandbox_id, port, "port-forward open");
                    let moved = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
                    tracing::info!(sandbox_id, port, bytes = ?moved.ok(), "port-forward closed");
                }
                Err(e) => tracing::info!(sandbox_id, port, error = %e, "port-forward refused"),
            }
        });
    }
}
