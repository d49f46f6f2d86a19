//! A container: its libcontainer state, its processes and its cgroup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cgroups::{self, CgroupError};
use crate::process::{Exit, Process, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("Container {id} is {status}; it must be {wanted} to {op}.")]
    WrongState { id: String, status: Status, wanted: &'static str, op: &'static str },
    #[error("Container {id} has no process {exec}.")]
    UnknownExec { id: String, exec: String },
    #[error("Container {id} already has a process {exec}.")]
    DuplicateExec { id: String, exec: String },
    #[error("Process {exec} of container {id} has already exited; it cannot be signalled.")]
    AlreadyExited { id: String, exec: String },
    #[error("Signal {signal} is not a valid signal number.")]
    BadSignal { signal: u32 },
    #[error("Cannot signal process {pid} of container {id}: {source}.")]
    Kill { id: String, pid: i32, source: nix::Error },
    /// The message carries the whole chain: libcontainer's top-level messages alone are vague.
    #[error("libcontainer cannot {op} container {id}: {}.", crate::helper::error_chain(.source))]
    Libcontainer { id: String, op: &'static str, source: libcontainer::error::LibcontainerError },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

pub struct Container {
    pub id: String,
    /// libcontainer's state directory of this container.
    pub state_dir: PathBuf,
    /// Where the agent keeps config.json and exec process documents.
    pub bundle: PathBuf,
    pub cgroup_path: PathBuf,
    status: Mutex<Status>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// The OOM-kill count already reported.
    oom_seen: AtomicU64,
    /// File systems mounted for this container, unmounted when it goes.
    storages: Mutex<crate::storage::Mounted>,
}

impl Container {
    pub fn new(id: &str, state_dir: PathBuf, bundle: PathBuf, cgroup_path: PathBuf, init: Arc<Process>) -> Self {
        Container {
            id: id.into(),
            state_dir,
            bundle,
            cgroup_path,
            status: Mutex::new(Status::Created),
            init,
            execs: Mutex::new(HashMap::new()),
            oom_seen: AtomicU64::new(0),
            storages: Mutex::new(Default::default()),
        }
    }

    pub fn set_storages(&self, mounted: crate::storage::Mounted) {
        *self.storages.lock().unwrap_or_else(|e| e.into_inner()) = mounted;
    }

    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_status(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    fn require(&self, wanted: &[Status], wanted_text: &'static str, op: &'static str) -> Result<(), ContainerError> {
        let status = self.status();
        if wanted.contains(&status) {
            Ok(())
        } else {
            Err(ContainerError::WrongState { id: self.id.clone(), status, wanted: wanted_text, op })
        }
    }

    fn libcontainer(&self, op: &'static str) -> Result<libcontainer::container::Container, ContainerError> {
        libcontainer::container::Container::load(self.state_dir.clone()).map_err(self.lc_err(op))
    }

    fn lc_err(&self, op: &'static str) -> impl Fn(libcontainer::error::LibcontainerError) -> ContainerError + '_ {
        move |source| ContainerError::Libcontainer { id: self.id.clone(), op, source }
    }

    pub fn start(&self) -> Result<(), ContainerError> {
        self.require(&[Status::Created], "created", "start it")?;
        let mut lc = self.libcontainer("start")?;
        lc.start().map_err(self.lc_err("start"))?;
        self.set_status(Status::Running);
        Ok(())
    }

    pub fn pause(&self) -> Result<(), ContainerError> {
        self.require(&[Status::Running], "running", "pause it")?;
        self.libcontainer("pause")?.pause().map_err(self.lc_err("pause"))?;
        self.set_status(Status::Paused);
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ContainerError> {
        self.require(&[Status::Paused], "paused", "resume it")?;
        self.libcontainer("resume")?.resume().map_err(self.lc_err("resume"))?;
        self.set_status(Status::Running);
        Ok(())
    }

    /// Checks that an exec may start and returns the path for its process document.
    pub fn prepare_exec(&self, exec_id: &str) -> Result<PathBuf, ContainerError> {
        self.require(&[Status::Running], "running", "exec into it")?;
        if self.execs.lock().unwrap_or_else(|e| e.into_inner()).contains_key(exec_id) {
            return Err(ContainerError::DuplicateExec { id: self.id.clone(), exec: exec_id.into() });
        }
        Ok(self.bundle.join(format!("exec-{exec_id}.json")))
    }

    pub fn add_exec(&self, process: Arc<Process>) {
        self.execs.lock().unwrap_or_else(|e| e.into_inner()).insert(process.exec_id.clone(), process);
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::UnknownExec { id: self.id.clone(), exec: exec_id.into() })
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut v: Vec<_> = self.execs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        v.push(self.init.clone());
        v
    }

    pub fn signal(&self, exec_id: &str, signal: u32, all: bool) -> Result<(), ContainerError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::BadSignal { signal })?;
        if all {
            return self.signal_all(sig);
        }
        let process = self.process(exec_id)?;
        let exited = || ContainerError::AlreadyExited {
            id: self.id.clone(),
            exec: if exec_id.is_empty() { "init".into() } else { exec_id.into() },
        };
        if process.exit().is_some() {
            return Err(exited());
        }
        match kill(Pid::from_raw(process.pid), sig) {
            Ok(()) => Ok(()),
            Err(nix::Error::ESRCH) => Err(exited()),
            Err(source) => Err(ContainerError::Kill { id: self.id.clone(), pid: process.pid, source }),
        }
    }

    /// Signals every process in the container's cgroup.
    pub fn signal_all(&self, sig: Signal) -> Result<(), ContainerError> {
        for pid in cgroups::pids(&self.cgroup_path, &self.id)? {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(source) => return Err(ContainerError::Kill { id: self.id.clone(), pid, source }),
            }
        }
        Ok(())
    }

    /// Reports a new OOM kill once; returns whether there was one since the last call.
    pub fn check_oom(&self) -> bool {
        let now = cgroups::oom_kills(&self.cgroup_path);
        let before = self.oom_seen.fetch_max(now, Ordering::SeqCst);
        now > before
    }

    pub fn oom_kills_seen(&self) -> u64 {
        self.oom_seen.load(Ordering::SeqCst)
    }

    /// Stops every process (SIGTERM, then SIGKILL after `grace`), then deletes the container's
    /// libcontainer state, cgroup and bundle. Leaves nothing behind.
    pub async fn destroy(&self, grace: Duration) -> Result<(), ContainerError> {
        if self.status() == Status::Paused {
            // A frozen process cannot act on a signal; thaw first.
            if let Ok(mut lc) = self.libcontainer("resume") {
                let _ = lc.resume();
            }
            self.set_status(Status::Running);
        }
        if self.init.exit().is_none() && !grace.is_zero() {
            let _ = self.signal_all(Signal::SIGTERM);
            let _ = tokio::time::timeout(grace, self.init.wait_exit()).await;
        }
        for attempt in 0..100 {
            let _ = self.signal_all(Signal::SIGKILL);
            let alive = cgroups::pids(&self.cgroup_path, &self.id).map(|p| !p.is_empty()).unwrap_or(false);
            let all_exited = self.all_processes().iter().all(|p| p.exit().is_some());
            if !alive && all_exited {
                break;
            }
            if attempt == 99 {
                tracing::warn!(container_id = %self.id, "processes survive SIGKILL; deleting anyway");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for p in self.all_processes() {
            p.abandon_stdio();
        }
        self.set_status(Status::Stopped);
        if self.state_dir.exists() {
            let mut lc = self.libcontainer("delete")?;
            lc.delete(true).map_err(self.lc_err("delete"))?;
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
        self.storages.lock().unwrap_or_else(|e| e.into_inner()).unmount_all();
        Ok(())
    }

    pub fn process_list(&self) -> Result<Vec<(i32, String)>, ContainerError> {
        let mut list: Vec<(i32, String)> = cgroups::pids(&self.cgroup_path, &self.id)?
            .into_iter()
            .map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| {
                        b.split(|c| *c == 0)
                            .filter(|w| !w.is_empty())
                            .map(|w| String::from_utf8_lossy(w).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                (pid, cmd)
            })
            .collect();
        list.sort();
        Ok(list)
    }
}

/// Valid container and exec ids: what containerd accepts, and safe as a path component.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The exit a process gets when its container is torn down before it was reaped.
pub fn killed_exit() -> Exit {
    Exit { status: 137, oom_killed: false }
}

pub fn bundle_config(bundle: &Path) -> PathBuf {
    bundle.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_path_safe() {
        for ok in ["c1", "a.b-c_d", "0123456789abcdef"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", "../etc", "a/b", ".hidden", "-x", "a b", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
