//! Starts a helper process (see `helper.rs`) with a new process's stdio and collects its
//! report, the new pid and, for a terminal, the pty master libcontainer sends back over the
//! console socket.

use std::ffi::OsString;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hull_proto::agent::StdioRequest;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixListener;

use crate::fd::{grow_pipe, pipe, AsyncFdStream};
use crate::helper::{Report, REPORT_FD};
use crate::process::PendingStdio;
use crate::reaper::Reaper;

/// How long a helper may take to create a container or an exec.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// Output pipes are grown to this size so that bulk output moves in large chunks.
const PIPE_SIZE: i32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("Cannot set up stdio for {what}: {source}.")]
    Stdio { what: String, source: std::io::Error },
    #[error("Cannot start the helper for {what}: {source}.")]
    Spawn { what: String, source: std::io::Error },
    #[error("The helper for {what} did not report within {secs} s and was killed.")]
    Timeout { what: String, secs: u64 },
    #[error("The helper for {what} exited without a report (status {status}).")]
    NoReport { what: String, status: i32 },
    #[error("The helper for {what} sent an unreadable report {line:?}.")]
    BadReport { what: String, line: String },
    #[error("Cannot {what}: {reason}")]
    Failed { what: String, reason: String },
    #[error("The terminal of {what} never arrived on the console socket: {source}.")]
    Console { what: String, source: BoxError },
}

/// The console socket fails in several ways (timeout, I/O, the message); any of them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Launched {
    pub pid: i32,
    pub stdio: PendingStdio,
}

pub struct Launcher<'a> {
    pub reaper: &'a Reaper,
    pub exe: &'a Path,
    /// Says what is being launched in error messages ("create container c1").
    pub what: String,
}

impl Launcher<'_> {
    pub async fn launch(
        &self,
        args: Vec<OsString>,
        stdio: &StdioRequest,
        console_socket: Option<&Path>,
    ) -> Result<Launched, LaunchError> {
        let io_err = |source| LaunchError::Stdio { what: self.what.clone(), source };
        let console = match console_socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                Some((UnixListener::bind(path).map_err(io_err)?, path.to_path_buf()))
            }
            None => None,
        };
        let mut pending = PendingStdio::default();
        let devnull = || -> std::io::Result<Stdio> {
            Ok(std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?.into())
        };
        let (child_in, child_out, child_err) = if console.is_some() {
            (devnull().map_err(io_err)?, devnull().map_err(io_err)?, devnull().map_err(io_err)?)
        } else {
            let child_in = if stdio.stdin {
                let (r, w) = pipe().map_err(io_err)?;
                pending.stdin = Some(w);
                Stdio::from(r)
            } else {
                devnull().map_err(io_err)?
            };
            let output = |wanted: bool, slot: &mut Option<OwnedFd>| -> std::io::Result<Stdio> {
                if !wanted {
                    return devnull();
                }
                let (r, w) = pipe()?;
                grow_pipe(&r, PIPE_SIZE);
                *slot = Some(r);
                Ok(Stdio::from(w))
            };
            let out = output(stdio.stdout, &mut pending.stdout).map_err(io_err)?;
            let err = output(stdio.stderr, &mut pending.stderr).map_err(io_err)?;
            (child_in, out, err)
        };

        let (report_r, report_w) = pipe().map_err(io_err)?;
        let report_raw: RawFd = report_w.as_raw_fd();
        let mut cmd = std::process::Command::new(self.exe);
        cmd.args(&args).stdin(child_in).stdout(child_out).stderr(child_err);
        // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl,
        // which are async-signal-safe; it touches no memory shared with other threads.
        unsafe {
            cmd.pre_exec(move || {
                if report_raw == REPORT_FD {
                    // dup2 onto itself would keep close-on-exec; clear it instead.
                    nix::fcntl::fcntl(report_raw, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
                } else {
                    nix::unistd::dup2(report_raw, REPORT_FD)?;
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| LaunchError::Spawn { what: self.what.clone(), source })?;
        let helper_pid = child.id() as i32;
        // The reaper owns the helper's exit status; std's Child is never waited on.
        let helper_exit = self.reaper.watch(helper_pid);
        drop(cmd);
        drop(report_w);

        let mut line = String::new();
        let mut reader = BufReader::new(AsyncFdStream::new(report_r).map_err(io_err)?);
        let read = tokio::time::timeout(HELPER_TIMEOUT, reader.read_line(&mut line)).await;
        if read.is_err() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(helper_pid), nix::sys::signal::Signal::SIGKILL);
            let _ = helper_exit.await;
            return Err(LaunchError::Timeout { what: self.what.clone(), secs: HELPER_TIMEOUT.as_secs() });
        }
        if line.trim().is_empty() {
            let status = helper_exit.await.unwrap_or(-1);
            return Err(LaunchError::NoReport { what: self.what.clone(), status });
        }
        let report: Report = serde_json::from_str(line.trim())
            .map_err(|_| LaunchError::BadReport { what: self.what.clone(), line: line.clone() })?;
        let pid = match report {
            Report::Pid(pid) => pid,
            Report::Error(reason) => {
                let _ = helper_exit.await;
                return Err(LaunchError::Failed { what: self.what.clone(), reason });
            }
        };
        if let Some((listener, path)) = console {
            let res = receive_pty(&listener).await;
            let _ = std::fs::remove_file(&path);
            pending.tty = Some(res.map_err(|source| LaunchError::Console { what: self.what.clone(), source })?);
        }
        let _ = helper_exit.await;
        Ok(Launched { pid, stdio: pending })
    }
}

/// Accepts libcontainer's connection on the console socket and receives the pty master.
async fn receive_pty(listener: &UnixListener) -> Result<OwnedFd, BoxError> {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| "no connection within 10 s")??;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    tokio::task::spawn_blocking(move || -> Result<OwnedFd, BoxError> {
        let mut buf = [0u8; 1024];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor for us via SCM_RIGHTS;
                    // nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err("the message carried no descriptor".into())
    })
    .await?
}

/// The argument list of a helper command.
pub fn helper_args(words: &[&str], paths: &[(&str, &Path)]) -> Vec<OsString> {
    let mut args: Vec<OsString> = words.iter().map(OsString::from).collect();
    for (flag, path) in paths {
        args.push(OsString::from(flag));
        args.push(PathBuf::from(path).into_os_string());
    }
    args
}
