//! The hybrid vsock handshake (Firecracker's): the host side of a guest's vsock device is a unix
//! socket. A host client opens it and writes `CONNECT <port>\n`; the VMM answers
//! `OK <hostport>\n` once the guest accepted the connection on `port` (or closes the socket),
//! and from then on the socket carries the connection's bytes. A guest connection to CID 2
//! port P goes to the unix socket `<uds>_P`.
//!
//! Both sides of the handshake live here: the runtime writes [`connect_line`] and reads the
//! answer with [`parse_ok`]; the VMM reads with [`parse_connect`] and answers [`ok_line`].

/// The longest handshake line either side reads (newline included); a longer one is refused.
pub const MAX_LINE: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("The hybrid vsock line {0:?} is not `CONNECT <port>`.")]
    NotConnect(String),
    #[error("The hybrid vsock refused the connection: {0:?}.")]
    Refused(String),
    #[error("The hybrid vsock line is longer than {MAX_LINE} bytes.")]
    TooLong,
}

/// What a host client writes to reach guest `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// What the VMM answers once the guest accepted; `host_port` is the connection's local port.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

fn text(line: &[u8]) -> Result<&str, HandshakeError> {
    if line.len() > MAX_LINE {
        return Err(HandshakeError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| HandshakeError::NotConnect(String::from_utf8_lossy(line).into_owned()))?;
    Ok(text.trim_end_matches('\n').trim_end_matches('\r'))
}

/// The guest port of a client's `CONNECT <port>` line (the word in any case, as Firecracker
/// accepts it).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let text = text(line)?;
    let bad = || HandshakeError::NotConnect(text.into());
    let (word, port) = text.split_once(' ').ok_or_else(bad)?;
    if !word.eq_ignore_ascii_case("connect") {
        return Err(bad());
    }
    port.trim().parse().map_err(|_| bad())
}

/// The host port of the VMM's `OK <hostport>` answer.
pub fn parse_ok(line: &[u8]) -> Result<u32, HandshakeError> {
    let text = text(line)?;
    let refused = || HandshakeError::Refused(text.into());
    text.strip_prefix("OK ").ok_or_else(refused)?.trim().parse().map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_in_any_case() {
        assert_eq!(parse_connect(connect_line(1024).as_bytes()), Ok(1024));
        assert_eq!(parse_connect(b"connect 52\n"), Ok(52));
        assert_eq!(parse_connect(b"Connect 7\r\n"), Ok(7));
        assert!(parse_connect(b"CONNECT\n").is_err());
        assert!(parse_connect(b"CONNECT x\n").is_err());
        assert!(parse_connect(b"LISTEN 5\n").is_err());
        assert!(parse_connect(b"CONNECT 99999999999\n").is_err());
        assert_eq!(parse_connect(&[b'C'; MAX_LINE + 1]), Err(HandshakeError::TooLong));
    }

    #[test]
    fn ok_lines_carry_the_host_port() {
        assert_eq!(parse_ok(ok_line(1073741824).as_bytes()), Ok(1073741824));
        assert_eq!(parse_ok(b"FAILED\n"), Err(HandshakeError::Refused("FAILED".into())));
        assert!(parse_ok(b"OK nope\n").is_err());
    }
}
