//! Child reaping and exit statuses.
//!
//! The agent is PID 1 in a guest and a child subreaper on a host, so every process a container
//! runs ends up as its child: container init and exec processes are reparented to the agent
//! when the short-lived helper that created them exits. One task reaps them all with
//! `waitpid(-1)`, and whoever wants a pid's status registers for it. A status can arrive before
//! the registration (the process died at once), so unclaimed statuses are kept, a bounded
//! number of them, oldest dropped first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How many unclaimed exit statuses are kept (orphans the agent never asked about).
const MAX_UNCLAIMED: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("Cannot install the SIGCHLD handler: {0}.")]
    Signal(#[source] std::io::Error),
    #[error("Cannot become a child subreaper: {0}.")]
    Subreaper(#[source] nix::Error),
}

/// An exit status as a shell reports it: the exit code, or 128 + the signal number.
pub fn shell_status(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<i32>>,
    unclaimed: HashMap<i32, i32>,
    unclaimed_order: VecDeque<i32>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

impl Reaper {
    /// Starts reaping. Must be called before the agent starts any child.
    pub fn start() -> Result<Reaper, ReaperError> {
        if nix::unistd::getpid().as_raw() != 1 {
            // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
            let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            Errno::result(rc).map_err(ReaperError::Subreaper)?;
        }
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let reaper = Reaper::default();
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    if let Some((pid, code)) = shell_status(status) {
                        self.deliver(pid, code);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "waitpid failed");
                    return;
                }
            }
        }
    }

    fn deliver(&self, pid: i32, code: i32) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = st.waiters.remove(&pid) {
            let _ = tx.send(code);
            return;
        }
        tracing::debug!(pid, status = code, "reaped a process nobody waits for");
        st.unclaimed.insert(pid, code);
        st.unclaimed_order.push_back(pid);
        while st.unclaimed_order.len() > MAX_UNCLAIMED {
            if let Some(old) = st.unclaimed_order.pop_front() {
                st.unclaimed.remove(&old);
            }
        }
    }

    /// Resolves with the exit status of `pid` once it has been reaped (or at once if it was).
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(code) = st.unclaimed.remove(&pid) {
            st.unclaimed_order.retain(|p| *p != pid);
            let _ = tx.send(code);
        } else {
            st.waiters.insert(pid, tx);
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn statuses_reach_waiters_registered_before_or_after_exit() {
        let reaper = Reaper::start().expect("reaper starts");
        let spawn = |args: &[&str]| {
            std::process::Command::new("/bin/sh").args(args).spawn().expect("sh runs").id() as i32
        };
        let early = spawn(&["-c", "exit 3"]);
        // Give the reaper time to collect it before anyone asks.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(reaper.watch(early).await.expect("status"), 3);

        let late = spawn(&["-c", "sleep 0.2; kill -TERM $$"]);
        assert_eq!(reaper.watch(late).await.expect("status"), 143);
    }
}
