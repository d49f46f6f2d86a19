//! The sandbox: the namespaces a pod's containers share.
//!
//! A small holder process (`hull-agent sandbox-holder`) creates new UTS and IPC namespaces (and
//! a network namespace on a host; inside a VM the pod's network is the VM's own) and sleeps;
//! containers join its namespaces through /proc/<holder>/ns/*. It also makes the pod's PID
//! namespace, whose PID 1 is its child, the pod's init (named `pause`: it reaps what is
//! orphaned there and dies with the holder); containers join that one only when the pod asks
//! (CRI's `pid: POD`). This is what the pause container does on a runc node.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::fd::{pipe, AsyncFdStream};
use crate::reaper::Reaper;
use crate::spec::SandboxNamespaces;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("The sandbox {0} already exists; DestroySandbox it first.")]
    Exists(String),
    #[error("The hostname {0:?} is not valid (1 to 64 characters of letters, digits, '-', '.').")]
    BadHostname(String),
    #[error("The sysctl {0:?} is not a sysctl name (letters, digits, '_', '-', separated by '.' or '/'), or its value spans lines.")]
    BadSysctl(String),
    #[error("Cannot start the sandbox namespace holder: {0}.")]
    Holder(#[source] std::io::Error),
    #[error("Cannot start the sandbox namespace holder: it exited with status {status} before it was ready: {output}.")]
    HolderNotReady { status: i32, output: String },
    #[error("Cannot write the sandbox's {path:?}: {source}.")]
    Write { path: PathBuf, source: std::io::Error },
}

pub struct Sandbox {
    pub id: String,
    pub namespaces: SandboxNamespaces,
    holder_pid: i32,
    dir: PathBuf,
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty() && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Sandbox {
    pub async fn create(
        id: &str,
        hostname: &str,
        dns: &[String],
        sysctls: &[(String, String)],
        exe: &Path,
        state_dir: &Path,
        init_mode: bool,
        reaper: &Reaper,
    ) -> Result<Sandbox, SandboxError> {
        let hostname = if hostname.is_empty() { id } else { hostname };
        if !valid_hostname(hostname) {
            return Err(SandboxError::BadHostname(hostname.into()));
        }
        if let Some((key, _)) = sysctls.iter().find(|(k, v)| sysctl_path(k).is_none() || v.contains('\n')) {
            return Err(SandboxError::BadSysctl(key.clone()));
        }
        let dir = state_dir.join("sandbox");
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Write { path: dir.clone(), source })?;
        let resolv = dir.join("resolv.conf");
        let mut text = dns.join("\n");
        text.push('\n');
        std::fs::write(&resolv, text).map_err(|source| SandboxError::Write { path: resolv.clone(), source })?;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n"))
            .map_err(|source| SandboxError::Write { path: hosts.clone(), source })?;

        let (ready_r, ready_w) = pipe().map_err(SandboxError::Holder)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["sandbox-holder", "--hostname", hostname]);
        if !init_mode {
            cmd.arg("--new-net");
        }
        for (key, value) in sysctls {
            cmd.arg("--sysctl").arg(format!("{key}={value}"));
        }
        cmd.stdin(std::process::Stdio::null()).stdout(ready_w).stderr(std::process::Stdio::inherit());
        let child = cmd.spawn().map_err(SandboxError::Holder)?;
        drop(cmd);
        let pid = child.id() as i32;
        let exited = reaper.watch(pid);
        let mut line = String::new();
        let mut reader = BufReader::new(AsyncFdStream::new(ready_r).map_err(SandboxError::Holder)?);
        let ok = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
        // "ready <pid of the pod's init>"
        let init = line.trim().strip_prefix("ready ").and_then(|p| p.parse::<i32>().ok());
        let (true, Some(init)) = (matches!(ok, Ok(Ok(_))), init) else {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let status = exited.await.unwrap_or(-1);
            return Err(SandboxError::HolderNotReady { status, output: line.trim().into() });
        };
        // The holder is reaped by the reaper; its status is of no interest.
        drop(exited);
        let ns = |n: &str| PathBuf::from(format!("/proc/{pid}/ns/{n}"));
        Ok(Sandbox {
            id: id.into(),
            namespaces: SandboxNamespaces { net: ns("net"), ipc: ns("ipc"), uts: ns("uts"), pid: PathBuf::from(format!("/proc/{init}/ns/pid")) },
            holder_pid: pid,
            dir,
        })
    }

    pub async fn destroy(&self, reaper: &Reaper) {
        let exited = reaper.watch(self.holder_pid);
        let _ = kill(Pid::from_raw(self.holder_pid), Signal::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), exited).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `hull-agent sandbox-holder`: unshare, set the hostname, start the pod's init, say
/// "ready <its pid>", sleep until killed.
pub fn holder_main(hostname: &str, new_net: bool, sysctls: &[String]) -> i32 {
    // CLONE_NEWPID applies to the children: the first one is PID 1 of the pod's namespace.
    let mut flags = CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWPID;
    if new_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let setup = nix::sched::unshare(flags)
        .and_then(|()| nix::unistd::sethostname(hostname));
    let mut out = std::io::stdout();
    match setup {
        Ok(()) => {
            if new_net {
                // Bring up loopback so that a pod on a host has at least 127.0.0.1: one blocking
                // netlink socket, no thread, so the holder stays single-threaded for its fork of
                // the pod's init.
                if let Err(e) = crate::network::loopback_up() {
                    let _ = writeln!(out, "cannot bring up lo: {e}");
                    return 1;
                }
            }
            // The pod's sysctls, in its namespaces (the guest's network namespace is the pod's),
            // before any container joins them.
            for kv in sysctls {
                let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
                let set = sysctl_path(key).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput)).and_then(|p| std::fs::write(p, value));
                if let Err(e) = set {
                    let _ = writeln!(out, "cannot set sysctl {key} to {value:?}: {e}");
                    return 1;
                }
            }
            // SAFETY: the holder is single-threaded (its subcommand runs before the agent starts
            // any thread), so the child may run any code.
            let init = match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => pod_init(),
                Ok(nix::unistd::ForkResult::Parent { child }) => child,
                Err(e) => {
                    let _ = writeln!(out, "cannot start the pod's init: {e}");
                    return 1;
                }
            };
            let _ = writeln!(out, "ready {init}");
            let _ = out.flush();
            loop {
                nix::unistd::pause();
            }
        }
        Err(e) => {
            let _ = writeln!(out, "unshare/sethostname failed: {e}");
            1
        }
    }
}

/// Where sysctl `key` lives under /proc/sys (dots or slashes separate its parts, as runc
/// takes them), or None for a name that could leave /proc/sys.
fn sysctl_path(key: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = key.split(['.', '/']).collect();
    let ok = parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    ok.then(|| parts.iter().fold(PathBuf::from("/proc/sys"), |path, p| path.join(p)))
}

/// PID 1 of the pod's PID namespace: reaps every process orphaned there, forever. It dies with
/// the holder, and with it everything in the namespace.
fn pod_init() -> ! {
    use nix::sys::signal::SigSet;
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let _ = nix::sys::prctl::set_name(c"pause");
    // SIGCHLD stays pending while blocked, so none is lost between the reaping and the wait.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    loop {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        let _ = chld.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names_stay_under_proc_sys() {
        assert_eq!(sysctl_path("kernel.shm_rmid_forced"), Some(PathBuf::from("/proc/sys/kernel/shm_rmid_forced")));
        assert_eq!(sysctl_path("net/ipv4/ip_forward"), Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward")));
        for bad in ["", "kernel..x", "../etc/passwd", "kernel/../../etc", "a b", "kernel.x\n"] {
            assert_eq!(sysctl_path(bad), None, "{bad:?}");
        }
    }
}
