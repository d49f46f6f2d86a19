//! One process of a container (its init or an exec) and the agent's ends of its stdio.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use hull_proto::stdio::StreamKind;
use tokio::sync::{oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("The {kind} stream of process {exec} of container {container} was not requested or is already attached.")]
    StreamUnavailable { container: String, exec: String, kind: StreamKind },
    #[error("Process {exec} of container {container} has no terminal.")]
    NoTerminal { container: String, exec: String },
    #[error("Cannot resize the terminal of process {exec} of container {container}: {source}.")]
    Resize { container: String, exec: String, source: nix::Error },
}

/// The agent's ends of a process's stdio that no stream connection has taken yet.
#[derive(Default)]
pub struct PendingStdio {
    /// Write end of the process's stdin pipe.
    pub stdin: Option<OwnedFd>,
    /// Read ends of the output pipes.
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The pty master of a process with a terminal.
    pub tty: Option<OwnedFd>,
}

impl PendingStdio {
    /// How many output streams (stdout, stderr or the tty) carry the process's bytes.
    fn outputs(&self) -> usize {
        [&self.stdout, &self.stderr, &self.tty].iter().filter(|f| f.is_some()).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: i32,
    pub oom_killed: bool,
}

pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub pid: i32,
    exit_tx: watch::Sender<Option<Exit>>,
    stdio: Mutex<PendingStdio>,
    /// Output streams whose last byte has not been delivered yet.
    outputs_left: watch::Sender<usize>,
    /// A duplicate of the pty master, for window resizes.
    pty: Option<OwnedFd>,
    /// Closes an attached stdin stream (CloseStdin).
    stdin_closer: Mutex<Option<oneshot::Sender<()>>>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, pid: i32, stdio: PendingStdio) -> Process {
        let pty = stdio.tty.as_ref().and_then(|m| m.try_clone().ok());
        let (exit_tx, _) = watch::channel(None);
        let (outputs_left, _) = watch::channel(stdio.outputs());
        Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            pid,
            exit_tx,
            stdio: Mutex::new(stdio),
            outputs_left,
            pty,
            stdin_closer: Mutex::new(None),
        }
    }

    fn name(&self) -> String {
        if self.exec_id.is_empty() { "init".into() } else { self.exec_id.clone() }
    }

    pub fn set_exit(&self, exit: Exit) {
        self.exit_tx.send_replace(Some(exit));
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// Waits for the exit only.
    pub async fn wait_exit(&self) -> Exit {
        let mut exit_rx = self.exit_tx.subscribe();
        // The sender lives in self, so the channel cannot close while we borrow self.
        let exit = exit_rx.wait_for(|e| e.is_some()).await.map(|e| *e);
        match exit {
            Ok(Some(e)) => e,
            _ => crate::container::killed_exit(),
        }
    }

    /// Waits for the exit, then for the last output byte to reach the client.
    pub async fn wait(&self) -> Exit {
        let exit = self.wait_exit().await;
        let mut left = self.outputs_left.subscribe();
        let _ = left.wait_for(|n| *n == 0).await;
        exit
    }

    /// Takes the agent's end of one stream for a stream connection.
    pub fn take_stream(&self, kind: StreamKind) -> Result<OwnedFd, ProcessError> {
        let mut stdio = self.stdio.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match kind {
            StreamKind::Stdin => &mut stdio.stdin,
            StreamKind::Stdout => &mut stdio.stdout,
            StreamKind::Stderr => &mut stdio.stderr,
            StreamKind::Tty => &mut stdio.tty,
        };
        slot.take().ok_or_else(|| ProcessError::StreamUnavailable {
            container: self.container_id.clone(),
            exec: self.name(),
            kind,
        })
    }

    /// A duplicate of the pty master for the tty stream's input direction.
    pub fn take_tty_input(&self) -> Option<OwnedFd> {
        self.pty.as_ref().and_then(|m| m.try_clone().ok())
    }

    /// An output stream delivered its last byte (or its connection broke).
    pub fn output_finished(&self) {
        self.outputs_left.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Registers the closer of an attached stdin stream.
    pub fn set_stdin_closer(&self, closer: oneshot::Sender<()>) {
        *self.stdin_closer.lock().unwrap_or_else(|e| e.into_inner()) = Some(closer);
    }

    /// Closes stdin, attached or not, so the process reads end of file. With a terminal the
    /// end of file is the terminal's EOF character.
    pub fn close_stdin(&self) {
        if let Some(pty) = &self.pty {
            let _ = nix::unistd::write(pty, &[0x04]);
            return;
        }
        self.stdio.lock().unwrap_or_else(|e| e.into_inner()).stdin = None;
        if let Some(closer) = self.stdin_closer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = closer.send(());
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or_else(|| ProcessError::NoTerminal {
            container: self.container_id.clone(),
            exec: self.name(),
        })?;
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
        let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        nix::errno::Errno::result(rc).map(drop).map_err(|source| ProcessError::Resize {
            container: self.container_id.clone(),
            exec: self.name(),
            source,
        })
    }

    /// Drops every stdio end no stream took, so that nothing waits for bytes that will never
    /// be delivered. Used when the process's container is removed.
    pub fn abandon_stdio(&self) {
        let mut stdio = self.stdio.lock().unwrap_or_else(|e| e.into_inner());
        let unattached = stdio.outputs();
        *stdio = PendingStdio::default();
        drop(stdio);
        for _ in 0..unattached {
            self.output_finished();
        }
    }
}
