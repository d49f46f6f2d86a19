//! The header of a stdio stream connection.
//!
//! Each stream of a process is its own connection to the agent's stdio listener, so that
//! copying is a plain byte copy with the socket's own back-pressure. The client writes one line,
//! `STREAM <kind> <container-id> [<exec-id>]\n`, and the agent answers `OK\n` or
//! `ERR <message>\n`; after `OK` the connection carries the stream's bytes:
//! - `stdin`: client → process; the client shuts down its write side for EOF.
//! - `stdout`, `stderr`: process → client, closed by the agent after the last byte.
//! - `tty`: both ways, for a process with a terminal.

use std::fmt;
use std::str::FromStr;

/// Longest header line the agent reads; ids are at most 64 bytes each.
pub const MAX_HEADER_LEN: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("The stdio header is empty.")]
    Empty,
    #[error("The stdio header does not start with STREAM: {0:?}.")]
    NotStream(String),
    #[error("The stdio stream kind {0:?} is not one of stdin, stdout, stderr, tty.")]
    UnknownKind(String),
    #[error("The stdio header has no container id.")]
    MissingContainerId,
    #[error("The stdio header has trailing words: {0:?}.")]
    Trailing(String),
}

/// Which stream of a process a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    Tty,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Tty => "tty",
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StreamKind {
    type Err = HeaderError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdin" => Ok(StreamKind::Stdin),
            "stdout" => Ok(StreamKind::Stdout),
            "stderr" => Ok(StreamKind::Stderr),
            "tty" => Ok(StreamKind::Tty),
            other => Err(HeaderError::UnknownKind(other.to_string())),
        }
    }
}

/// The first line of a stdio connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub kind: StreamKind,
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
}

impl StreamHeader {
    /// The header line, newline included.
    pub fn to_line(&self) -> String {
        if self.exec_id.is_empty() {
            format!("STREAM {} {}\n", self.kind, self.container_id)
        } else {
            format!("STREAM {} {} {}\n", self.kind, self.container_id, self.exec_id)
        }
    }

    /// Parses a header line, with or without its newline.
    pub fn parse(line: &str) -> Result<Self, HeaderError> {
        let mut words = line.split_ascii_whitespace();
        let first = words.next().ok_or(HeaderError::Empty)?;
        if first != "STREAM" {
            return Err(HeaderError::NotStream(first.to_string()));
        }
        let kind: StreamKind = words
            .next()
            .ok_or_else(|| HeaderError::UnknownKind(String::new()))?
            .parse()?;
        let container_id = words.next().ok_or(HeaderError::MissingContainerId)?.to_string();
        let exec_id = words.next().unwrap_or_default().to_string();
        let rest: Vec<&str> = words.collect();
        if !rest.is_empty() {
            return Err(HeaderError::Trailing(rest.join(" ")));
        }
        Ok(StreamHeader { kind, container_id, exec_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for exec_id in ["", "exec-1"] {
            let h = StreamHeader {
                kind: StreamKind::Stderr,
                container_id: "c1".into(),
                exec_id: exec_id.into(),
            };
            assert_eq!(StreamHeader::parse(&h.to_line()), Ok(h));
        }
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(StreamHeader::parse(""), Err(HeaderError::Empty));
        assert_eq!(
            StreamHeader::parse("GET / HTTP/1.1"),
            Err(HeaderError::NotStream("GET".into()))
        );
        assert_eq!(
            StreamHeader::parse("STREAM stdpipe c1"),
            Err(HeaderError::UnknownKind("stdpipe".into()))
        );
        assert_eq!(StreamHeader::parse("STREAM stdout"), Err(HeaderError::MissingContainerId));
        assert_eq!(
            StreamHeader::parse("STREAM stdout c1 e1 extra"),
            Err(HeaderError::Trailing("extra".into()))
        );
    }
}
