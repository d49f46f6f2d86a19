//! hull-vmm's control socket: one request line per connection, one reply line.
//!
//! ```text
//! state   -> running | paused | ended
//! pause   -> ok (was: running)      resume -> ok (was: paused)
//! stop    -> ok                     anything else -> error: unknown request "..."
//! snapshot DIR -> ok (N bytes of memory) | error: ...   (the VM must be paused; it stays so)
//! ```
//! `hull-vmm ctl --api-socket PATH <request>` is the client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::running_vm::Controller;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Cannot listen on the API socket {path:?}: {source}.")]
    Listen { path: std::path::PathBuf, source: std::io::Error },
    #[error("Cannot reach the VMM at {path:?}: {source}.")]
    Connect { path: std::path::PathBuf, source: std::io::Error },
    #[error("The VMM answered: {0}")]
    Refused(String),
    #[error("The VMM at {0:?} closed the connection without answering (did it exit?).")]
    NoAnswer(std::path::PathBuf),
}

/// The answer to one request line.
pub fn answer(controller: &Controller, request: &str) -> String {
    match request.trim() {
        "state" => controller.state().as_str().to_string(),
        "pause" => format!("ok (was: {})", controller.pause().as_str()),
        "resume" => format!("ok (was: {})", controller.resume().as_str()),
        "stop" => {
            controller.stop();
            "ok".to_string()
        }
        other => match other.strip_prefix("snapshot ") {
            Some(dir) if !dir.trim().is_empty() => match controller.snapshot(Path::new(dir.trim())) {
                Ok(saved) => format!("ok ({} bytes of memory, {} bytes of state)", saved.memory_bytes, saved.state_bytes),
                Err(e) => format!("error: {e}"),
            },
            _ => format!("error: unknown request {other:?} (state, pause, resume, stop, snapshot DIR)"),
        },
    }
}

pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    hull_proto::host_socket::bind_owner_only(path).map_err(|source| ApiError::Listen { path: path.into(), source })
}

/// Serves requests until the process ends. A client that sends garbage or hangs up early
/// affects only its own connection.
pub fn serve(listener: UnixListener, controller: Controller) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let mut line = String::new();
        // Requests are a word and perhaps a path; a client sending more gets what fits in 4 KiB.
        let mut reader = BufReader::new(std::io::Read::take(&mut conn, 4096));
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let reply = answer(&controller, &line);
        tracing::info!(request = line.trim(), reply = %reply, "API request");
        let _ = conn.write_all(format!("{reply}\n").as_bytes());
    }
}

/// Sends one request; returns the reply line, or an error for an `error:` reply.
pub fn request(path: &Path, what: &str) -> Result<String, ApiError> {
    let connect = |source| ApiError::Connect { path: path.into(), source };
    let mut s = UnixStream::connect(path).map_err(connect)?;
    s.write_all(format!("{what}\n").as_bytes()).map_err(connect)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(connect)?;
    let line = line.trim().to_string();
    if line.is_empty() {
        return Err(ApiError::NoAnswer(path.into()));
    }
    if line.starts_with("error:") {
        return Err(ApiError::Refused(line));
    }
    Ok(line)
}
