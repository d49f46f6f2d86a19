//! The port-forward handshake: how the host opens a TCP connection to a port on the pod's
//! loopback inside the guest (what `kubectl port-forward` asks of a pod).
//!
//! The host connects to the agent's forward port (vsock 1026) and writes one line,
//! `FORWARD <port>\n`; the agent connects to that port on the guest's loopback and answers
//! `OK\n`, or `ERR <message>\n` and closes. After `OK` the connection carries the TCP stream's
//! bytes both ways; either side's EOF is passed on as a half-close.

/// Longest line either side reads (newline included).
pub const MAX_LINE: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("The port-forward line {0:?} is not `FORWARD <port>` with a port from 1 to 65535.")]
    NotForward(String),
    #[error("The agent refused the port-forward: {0}.")]
    Refused(String),
    #[error("The port-forward line is longer than {MAX_LINE} bytes.")]
    TooLong,
}

/// What the host writes to reach guest loopback `port`.
pub fn request_line(port: u16) -> String {
    format!("FORWARD {port}\n")
}

fn text(line: &[u8]) -> Result<String, ForwardError> {
    if line.len() > MAX_LINE {
        return Err(ForwardError::TooLong);
    }
    Ok(String::from_utf8_lossy(line).trim_end_matches('\n').trim_end_matches('\r').to_string())
}

/// The port of a `FORWARD <port>` line.
pub fn parse_request(line: &[u8]) -> Result<u16, ForwardError> {
    let text = text(line)?;
    match text.strip_prefix("FORWARD ").map(str::parse::<u16>) {
        Some(Ok(port)) if port != 0 => Ok(port),
        _ => Err(ForwardError::NotForward(text)),
    }
}

/// The agent's answer once the guest connection stands.
pub const OK_LINE: &str = "OK\n";

/// The agent's answer when it cannot connect.
pub fn err_line(message: &str) -> String {
    // One line, whatever the message holds.
    format!("ERR {}\n", message.replace(['\n', '\r'], " "))
}

/// Ok for `OK`, the agent's message for `ERR ...`.
pub fn parse_reply(line: &[u8]) -> Result<(), ForwardError> {
    let text = text(line)?;
    if text == "OK" {
        return Ok(());
    }
    Err(ForwardError::Refused(text.strip_prefix("ERR ").unwrap_or(&text).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_a_port() {
        assert_eq!(parse_request(request_line(8080).as_bytes()), Ok(8080));
        assert_eq!(parse_request(b"FORWARD 1\r\n"), Ok(1));
        for bad in [&b"FORWARD 0\n"[..], b"FORWARD 65536\n", b"FORWARD\n", b"STREAM tty c1\n", b"FORWARD -1\n"] {
            assert!(matches!(parse_request(bad), Err(ForwardError::NotForward(_))), "{bad:?}");
        }
        assert_eq!(parse_request(&[b'F'; MAX_LINE + 1]), Err(ForwardError::TooLong));
    }

    #[test]
    fn replies_are_ok_or_the_agents_message() {
        assert_eq!(parse_reply(OK_LINE.as_bytes()), Ok(()));
        assert_eq!(parse_reply(err_line("nothing listens\non 80").as_bytes()), Err(ForwardError::Refused("nothing listens on 80".into())));
    }
}
