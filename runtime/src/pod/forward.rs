//! `kubectl port-forward` into a pod VM.
//!
//! containerd's CRI forwards a port the way it does for runc pods: it enters the pod's network
//! namespace on the host and dials `localhost:PORT` (IPv4 first, then IPv6; containerd 1.6 and
//! 2.x alike). With hull nothing listens there: the pod's servers run in the guest, and the
//! namespace's loopback is the host's. So the shim listens on one loopback port of that
//! namespace, an iptables `REDIRECT` in its `nat OUTPUT` chain sends every TCP connection to
//! 127.0.0.0/8 there (no other process uses that loopback: the VMM runs in the host's namespace
//! and gets the tap as a descriptor), and for each connection the shim reads the port it was
//! meant for (`SO_ORIGINAL_DST`) and relays it over vsock to the agent, which dials that port on
//! the guest's loopback (`hull_proto::forward`). Every IPv4 dial succeeds at once, so
//! containerd never falls back to IPv6; the agent tries 127.0.0.1, then ::1.
//!
//! The rule lives and dies with the pod's network namespace; a connection whose port nothing
//! serves in the guest is closed at once (containerd reports the stream's end).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};

use crate::agent::client::AgentConn;

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("Cannot open the pod network namespace {path:?}: {source}.")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("Cannot enter the pod network namespace {path:?}: {source}.")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("Cannot listen on the loopback of the pod network namespace: {0}.")]
    Listen(#[source] std::io::Error),
    #[error("Cannot run iptables to redirect loopback connections in the pod network namespace (port-forward needs it): {0}.")]
    Iptables(#[source] std::io::Error),
    #[error("iptables could not add the loopback redirect in the pod network namespace ({status}): {stderr}")]
    IptablesFailed { status: std::process::ExitStatus, stderr: String },
    #[error("The thread that entered the pod network namespace panicked.")]
    Panicked,
}

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
        let path = netns.to_path_buf();
        // A thread of its own enters the namespace (a socket belongs to the namespace of the
        // thread that made it, and a child process inherits its creator thread's) and then
        // ends, so no thread of the runtime ever leaves the host's namespace.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(listen_in(&path));
        });
        let listener = rx.await.map_err(|_| PortForwardError::Panicked)??;
        let listener = TcpListener::from_std(listener).map_err(PortForwardError::Listen)?;
        let task = tokio::spawn(relay(listener, conn, sandbox_id.to_string()));
        Ok(PortForwarder { task })
    }
}

fn listen_in(netns: &Path) -> Result<std::net::TcpListener, PortForwardError> {
    let ns = std::fs::File::open(netns).map_err(|source| PortForwardError::Netns { path: netns.into(), source })?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| PortForwardError::Setns { path: netns.into(), source })?;
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(PortForwardError::Listen)?;
    listener.set_nonblocking(true).map_err(PortForwardError::Listen)?;
    let port = listener.local_addr().map_err(PortForwardError::Listen)?.port();
    // -w: CNI plugins of other pods may hold the xtables lock for a moment.
    let out = Command::new("iptables")
        .args(["-w", "10", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.0/8", "-j", "REDIRECT", "--to-ports"])
        .arg(port.to_string())
        .output()
        .map_err(PortForwardError::Iptables)?;
    if !out.status.success() {
        return Err(PortForwardError::IptablesFailed { status: out.status, stderr: String::from_utf8_lossy(&out.stderr).trim().into() });
    }
    Ok(listener)
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
            match conn.forward(port).await {
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
