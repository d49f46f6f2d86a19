//! stdio between containerd's FIFOs and the agent's stream connections. Plain copies: the
//! FIFOs' and sockets' own buffers give back-pressure, nothing is buffered without bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hull_proto::agent::StdioRequest;
use hull_proto::stdio::StreamKind;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::agent::{AgentConn, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("Cannot open the {what} FIFO {path:?}: {source}.")]
    Fifo { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Attach(#[from] ClientError),
}

/// The stdio paths containerd gives a process ("" = no such stream).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// What to ask the agent for.
    pub fn request(&self) -> StdioRequest {
        let mut r = StdioRequest::new();
        r.stdin = !self.stdin.is_empty();
        r.stdout = !self.stdout.is_empty();
        r.stderr = !self.stderr.is_empty() && !self.terminal;
        r
    }
}

/// A process's running relays.
pub struct ProcessIo {
    /// Our write end of the stdin FIFO: it keeps the FIFO from reading EOF before containerd
    /// opened it. CloseIO drops it, so EOF arrives once containerd closes its end too.
    stdin_hold: std::sync::Mutex<Option<std::fs::File>>,
    outputs: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl ProcessIo {
    pub fn close_stdin(&self) {
        if let Ok(mut h) = self.stdin_hold.lock() {
            h.take();
        }
    }

    /// Waits until the output relays have delivered everything (they end at the stream's EOF,
    /// which the agent sends after the process's last byte), at most `limit`.
    pub async fn drain(&self, limit: Duration) {
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *self.outputs.lock().await);
        for h in handles {
            let abort = h.abort_handle();
            if tokio::time::timeout(limit, h).await.is_err() {
                abort.abort();
            }
        }
    }
}

fn fifo_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(std::io::Error) -> IoError + 'a {
    move |source| IoError::Fifo { what, path: path.into(), source }
}

/// An output FIFO opened for writing without waiting for a reader.
fn open_output(what: &'static str, path: &str) -> Result<pipe::Sender, IoError> {
    pipe::OpenOptions::new().read_write(true).open_sender(path).map_err(fifo_err(what, path))
}

async fn copy_out<R: AsyncRead + Unpin>(mut from: R, mut to: pipe::Sender) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.flush().await;
}

/// Connects the process's streams in the agent to containerd's FIFOs. Call after the process
/// was created and before it starts.
pub async fn connect(conn: &Arc<AgentConn>, id: &str, exec_id: &str, paths: &StdioPaths) -> Result<ProcessIo, IoError> {
    let mut outputs = Vec::new();
    let mut stdin_hold = None;
    let stdin = if paths.stdin.is_empty() {
        None
    } else {
        let hold = std::fs::OpenOptions::new().read(true).write(true).open(&paths.stdin).map_err(fifo_err("stdin", &paths.stdin))?;
        let rx = pipe::OpenOptions::new().open_receiver(&paths.stdin).map_err(fifo_err("stdin", &paths.stdin))?;
        stdin_hold = Some(hold);
        Some(rx)
    };
    if paths.terminal {
        let stream = conn.attach(id, exec_id, StreamKind::Tty).await?;
        let (rd, wr) = tokio::io::split(stream);
        if !paths.stdout.is_empty() {
            outputs.push(tokio::spawn(copy_out(rd, open_output("stdout", &paths.stdout)?)));
        }
        if let Some(rx) = stdin {
            // A tty stream carries both directions, so stdin's end is told with CloseStdin.
            let conn = conn.clone();
            let (id, exec_id) = (id.to_string(), exec_id.to_string());
            tokio::spawn(async move {
                copy_in(rx, wr).await;
                let _ = conn.close_stdin(&id, &exec_id).await;
            });
        }
    } else {
        for (kind, what, path) in [(StreamKind::Stdout, "stdout", &paths.stdout), (StreamKind::Stderr, "stderr", &paths.stderr)] {
            if path.is_empty() {
                continue;
            }
            let fifo = open_output(what, path)?;
            let stream = conn.attach(id, exec_id, kind).await?;
            outputs.push(tokio::spawn(copy_out(stream, fifo)));
        }
        if let Some(rx) = stdin {
            let mut stream = conn.attach(id, exec_id, StreamKind::Stdin).await?;
            tokio::spawn(async move {
                copy_in(rx, &mut stream).await;
                // The stream's end is the process's stdin EOF.
                let _ = stream.shutdown().await;
            });
        }
    }
    Ok(ProcessIo { stdin_hold: std::sync::Mutex::new(stdin_hold), outputs: tokio::sync::Mutex::new(outputs) })
}

async fn copy_in<W: AsyncWrite + Unpin>(mut from: pipe::Receiver, mut to: W) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.flush().await;
}
