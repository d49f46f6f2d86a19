//! QEMU's machine protocol (QMP) on the VM's socket, for what a command line cannot do:
//! snapshots (`snapshot`) save a running VM and hot-plug devices into a restored one. One JSON
//! object per line; events arrive between replies and are kept for `event`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The QMP socket in the VM's socket directory.
pub const QMP_SOCKET: &str = "qmp.sock";

/// The longest line QEMU's replies and events are read to: far above any reply used here.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Cannot reach QEMU's QMP socket {path:?} within {secs} s: {source}.")]
    Connect { path: PathBuf, secs: u64, source: std::io::Error },
    #[error("QMP I/O with QEMU failed: {0}.")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed its QMP socket.")]
    Closed,
    #[error("QEMU sent a QMP line over {MAX_LINE} bytes.")]
    TooLong,
    #[error("QEMU sent a QMP line that is not JSON: {0}.")]
    Json(#[from] serde_json::Error),
    #[error("QEMU refused {command}: {desc}")]
    Refused { command: String, desc: String },
    #[error("QEMU did not {what} within {secs} s.")]
    Timeout { what: String, secs: u64 },
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Events read while waiting for a reply.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (QEMU creates the socket as it starts: retried until `limit`), reads the
    /// greeting and leaves capabilities negotiation.
    pub async fn connect(path: &Path, limit: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            // The socket's directory is the jailed QEMU's: connected to as the file it is.
            match crate::agent::client::connect_socket_file(path).await {
                Ok(s) => break s,
                Err(source) if Instant::now() > deadline => return Err(QmpError::Connect { path: path.into(), secs: limit.as_secs(), source }),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w, events: Vec::new() };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Refused { command: "the greeting".into(), desc: greeting.to_string() });
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if n > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        Ok(serde_json::from_slice(&line)?)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command, "arguments": arguments }).to_string();
        msg.push('\n');
        self.writer.write_all(msg.as_bytes()).await?;
        loop {
            let mut v = self.read().await?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            let desc = v.pointer("/error/desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
            return Err(QmpError::Refused { command: command.into(), desc });
        }
    }

    /// Waits (at most `limit`) for the event `name` whose data satisfies `matches`.
    pub async fn event(&mut self, name: &str, matches: impl Fn(&Value) -> bool, limit: Duration) -> Result<Value, QmpError> {
        let is_it = |v: &Value| v.get("event").and_then(Value::as_str) == Some(name) && matches(v.get("data").unwrap_or(&Value::Null));
        if let Some(i) = self.events.iter().position(is_it) {
            return Ok(self.events.remove(i));
        }
        let timeout = || QmpError::Timeout { what: format!("send {name}"), secs: limit.as_secs() };
        tokio::time::timeout(limit, async {
            loop {
                let v = self.read().await?;
                if is_it(&v) {
                    return Ok(v);
                }
            }
        })
        .await
        .map_err(|_| timeout())?
    }

    /// Polls `query-migrate` until the migration has completed (or failed: its error).
    pub async fn migration_completed(&mut self, limit: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.execute("query-migrate", json!({})).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let desc = r.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
                    return Err(QmpError::Refused { command: "migrate".into(), desc });
                }
                _ if Instant::now() > deadline => return Err(QmpError::Timeout { what: "complete the migration".into(), secs: limit.as_secs() }),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}
