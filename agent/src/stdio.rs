//! The stdio listener: one connection per process stream (see `hull_proto::stdio`).
//!
//! Bytes move with plain copies between the process's pipe (or pty) and the connection, so the
//! socket's and the pipe's own buffers are the only buffering: a slow reader stalls the process
//! at its next write, and the agent never holds more than one copy buffer per stream.

use std::sync::Arc;
use std::time::Duration;

use hull_proto::stdio::{StreamHeader, StreamKind, MAX_HEADER_LEN};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use crate::agent::Agent;
use crate::fd::AsyncFdStream;
use crate::process::Process;

/// Copy buffer per stream; large enough that bulk output needs few system calls.
const COPY_BUF: usize = 256 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("No stdio header within {0:?}.")]
    HeaderTimeout(Duration),
    #[error("The stdio header is longer than {MAX_HEADER_LEN} bytes.")]
    HeaderTooLong,
    #[error("Cannot read the stdio header: {0}.")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    Header(#[from] hull_proto::stdio::HeaderError),
    #[error(transparent)]
    Lookup(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Stream(#[from] crate::process::ProcessError),
}

/// Serves one accepted connection until its stream ends.
pub async fn handle<S>(stream: S, agent: Arc<Agent>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = BufReader::new(stream);
    let (header, process, fd) = match attach(&mut conn, &agent).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "stdio connection refused");
            let _ = conn.get_mut().write_all(format!("ERR {e}\n").as_bytes()).await;
            let _ = conn.get_mut().shutdown().await;
            return;
        }
    };
    if conn.get_mut().write_all(b"OK\n").await.is_err() {
        finish_unattached(&header, &process);
        return;
    }
    tracing::debug!(container_id = %header.container_id, exec_id = %header.exec_id, stream = %header.kind, "stdio attached");
    let io = match AsyncFdStream::new(fd) {
        Ok(io) => io,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll a stdio descriptor");
            finish_unattached(&header, &process);
            return;
        }
    };
    match header.kind {
        StreamKind::Stdout | StreamKind::Stderr => {
            copy_out(io, conn, &process).await;
        }
        StreamKind::Stdin => {
            let (closer, closed) = oneshot::channel();
            process.set_stdin_closer(closer);
            copy_in(conn, io, closed).await;
        }
        StreamKind::Tty => {
            let input = match process.take_tty_input() {
                Some(fd) => AsyncFdStream::new(fd).ok(),
                None => None,
            };
            let (rd, wr) = tokio::io::split(conn);
            if let Some(input) = input {
                let (closer, closed) = oneshot::channel();
                process.set_stdin_closer(closer);
                tokio::spawn(copy_in(rd, input, closed));
            }
            copy_out(io, wr, &process).await;
        }
    }
}

async fn attach<S>(
    conn: &mut BufReader<S>,
    agent: &Agent,
) -> Result<(StreamHeader, Arc<Process>, std::os::fd::OwnedFd), StdioError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut line = Vec::new();
    let mut limited = (&mut *conn).take(MAX_HEADER_LEN as u64 + 1);
    let read = tokio::time::timeout(HEADER_TIMEOUT, limited.read_until(b'\n', &mut line)).await;
    match read {
        Err(_) => return Err(StdioError::HeaderTimeout(HEADER_TIMEOUT)),
        Ok(Err(e)) => return Err(StdioError::Read(e)),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_HEADER_LEN {
        return Err(StdioError::HeaderTooLong);
    }
    let header = StreamHeader::parse(&String::from_utf8_lossy(&line))?;
    let process = agent.process(&header.container_id, &header.exec_id)?;
    let fd = process.take_stream(header.kind)?;
    Ok((header, process, fd))
}

fn finish_unattached(header: &StreamHeader, process: &Process) {
    if header.kind != StreamKind::Stdin {
        process.output_finished();
    }
}

async fn copy_out<W>(from: AsyncFdStream, mut to: W, process: &Process)
where
    W: AsyncWrite + Unpin,
{
    let mut from = BufReader::with_capacity(COPY_BUF, from);
    if let Err(e) = tokio::io::copy_buf(&mut from, &mut to).await {
        tracing::debug!(container_id = %process.container_id, exec_id = %process.exec_id, error = %e, "output stream ended early");
    }
    let _ = to.shutdown().await;
    process.output_finished();
}

async fn copy_in<R>(mut from: R, mut to: AsyncFdStream, closed: oneshot::Receiver<()>)
where
    R: AsyncRead + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy(&mut from, &mut to) => {}
        _ = closed => {}
    }
    // Dropping `to` closes the pipe: the process reads end of file.
}
