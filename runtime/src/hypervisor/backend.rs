//! hull's device backends as processes of their own: `hull-vmm vhost-user vsock|fs`, each in
//! its jail, serving a vhost-user socket in the VM's socket directory. QEMU drives both; the
//! builtin engine drives the fs one (hull-vmm then runs unprivileged, and the uid-0 file server
//! shares no memory with it but the guest's).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use super::jail::{Needs, Placement};
use super::{HypervisorError, Logs, Watched};

/// The backends' sockets in the VM's socket directory.
pub const VHOST_VSOCK: &str = "vhost-vsock.sock";
pub const VHOST_FS: &str = "vhost-fs.sock";

/// Starts one `hull-vmm vhost-user ...` backend whose messages go to `log` in the VM directory,
/// and waits until it serves its vhost-user socket `socket` (in the VM's socket directory).
async fn start(at: &Placement<'_>, what: &'static str, args: Vec<OsString>, needs: Needs<'_>, socket: &str, log: &str) -> Result<Watched, HypervisorError> {
    let (spec, dir) = (at.spec, at.dir);
    let host_socket = dir.run().join(socket);
    let mut all: Vec<OsString> = ["--log-level", "warn", "--open-files", &spec.open_files.to_string(), "vhost-user"].iter().map(OsString::from).collect();
    all.extend(args);
    let mut cmd = at.command(log.trim_end_matches(".log"), at.vmm, all, needs)?;
    let backend = Watched::spawn(&mut cmd, what, &Logs { dir, stdout: None, stderr: log, cap: spec.log_cap })?;
    // The backend creates its socket when it listens (owner-only from the start, see
    // hull_proto::host_socket); nothing announces it otherwise.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host_socket.exists() {
        if let Some(status) = backend.exited() {
            backend.logs_complete(Duration::from_secs(2)).await;
            let log = std::fs::read_to_string(dir.file(log)).unwrap_or_default();
            return Err(HypervisorError::BackendExited { what, status: status.to_string(), log: log.trim().into() });
        }
        if Instant::now() > deadline {
            backend.kill().await;
            return Err(HypervisorError::BackendTimeout(host_socket));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if needs.share {
        // Served as uid 0; the VMM, unprivileged, must reach it.
        if let Err(e) = at.hand_socket_to_jail(socket) {
            backend.kill().await;
            return Err(e);
        }
    }
    Ok(backend)
}

fn os(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

/// The vsock backend, its hybrid host side at the VM's `vsock.sock`.
pub async fn start_vsock(at: &Placement<'_>) -> Result<Watched, HypervisorError> {
    let mut args = os(&["vsock", "--guest-cid", &at.spec.guest_cid.to_string(), "--socket"]);
    args.extend([at.socket(VHOST_VSOCK).into(), "--uds".into(), at.socket("vsock.sock").into()]);
    start(at, "hull-vmm vhost-user vsock", args, Needs::default(), VHOST_VSOCK, "vhost-user-vsock.log").await
}

/// The fs backend serving the VM's share (as uid 0 with a file server's capabilities, the one
/// process that sees the share), if the VM has one.
pub async fn start_fs(at: &Placement<'_>) -> Result<Option<Watched>, HypervisorError> {
    let (Some(share), Some(shared_dir)) = (&at.spec.share, at.share()) else { return Ok(None) };
    let mut args = os(&["fs", "--tag", &share.tag, "--socket"]);
    args.extend([at.socket(VHOST_FS).into(), "--shared-dir".into(), shared_dir.into()]);
    let needs = Needs { share: true, ..Needs::default() };
    start(at, "hull-vmm vhost-user fs", args, needs, VHOST_FS, "vhost-user-fs.log").await.map(Some)
}
