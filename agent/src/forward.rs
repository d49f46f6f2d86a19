//! The port-forward listener: one connection per forwarded TCP connection (see
//! `hull_proto::forward`). It is how `kubectl port-forward` reaches a pod: containerd dials
//! localhost:PORT in the pod's network namespace on the host, the shim relays that connection
//! here, and the agent dials the same port on the guest's loopback. Inside a VM the pod's
//! network namespace is the guest's own (the sandbox holder makes none), so the agent's
//! loopback is the pod's.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hull_proto::forward::{err_line, parse_request, ForwardError, MAX_LINE, OK_LINE};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LINE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("No port-forward line within {0:?}.")]
    Timeout(Duration),
    #[error("Cannot read the port-forward line: {0}.")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    Line(#[from] ForwardError),
    #[error("Nothing accepts connections on port {port} of the pod's loopback (127.0.0.1: {v4}; ::1: {v6}).")]
    Connect { port: u16, v4: std::io::Error, v6: std::io::Error },
}

/// Serves one accepted connection until both directions have ended.
pub async fn handle<S>(stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = BufReader::new(stream);
    let (port, mut target) = match open(&mut conn).await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %e, "port-forward refused");
            let _ = conn.get_mut().write_all(err_line(&e.to_string()).as_bytes()).await;
            let _ = conn.get_mut().shutdown().await;
            return;
        }
    };
    if conn.get_mut().write_all(OK_LINE.as_bytes()).await.is_err() {
        return;
    }
    tracing::debug!(port, "port-forward open");
    // Bytes the host sent after its line are in conn's buffer and go first.
    match tokio::io::copy_bidirectional(&mut conn, &mut target).await {
        Ok((to_guest, to_host)) => tracing::debug!(port, to_guest, to_host, "port-forward closed"),
        Err(e) => tracing::debug!(port, error = %e, "port-forward ended early"),
    }
}

async fn open<S>(conn: &mut BufReader<S>) -> Result<(u16, TcpStream), PortForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut line = Vec::new();
    let mut limited = (&mut *conn).take(MAX_LINE as u64 + 1);
    match tokio::time::timeout(LINE_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
        Err(_) => return Err(PortForwardError::Timeout(LINE_TIMEOUT)),
        Ok(Err(e)) => return Err(PortForwardError::Read(e)),
        Ok(Ok(_)) => {}
    }
    let port = parse_request(&line)?;
    // IPv4 first, then IPv6: containerd's own order when it dials localhost for runc pods.
    let v4 = connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
    let v4 = match v4 {
        Ok(s) => return Ok((port, s)),
        Err(e) => e,
    };
    match connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
        Ok(s) => Ok((port, s)),
        Err(v6) => Err(PortForwardError::Connect { port, v4, v6 }),
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over a real loopback: the line, the reply, then the bytes both ways; a port nobody
    /// listens on is refused naming it.
    #[tokio::test]
    async fn forwards_to_a_loopback_port_or_says_why_not() {
        let server = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut word = [0u8; 4];
            s.read_exact(&mut word).await.unwrap();
            s.write_all(&word.map(|b| b.to_ascii_uppercase())).await.unwrap();
        });
        let (mut host, agent_side) = tokio::io::duplex(4096);
        tokio::spawn(handle(agent_side));
        host.write_all(format!("FORWARD {port}\nping").as_bytes()).await.unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"OK\nPING");

        let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let (mut host, agent_side) = tokio::io::duplex(4096);
        tokio::spawn(handle(agent_side));
        host.write_all(format!("FORWARD {port}\n").as_bytes()).await.unwrap();
        let mut got = String::new();
        host.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("ERR Nothing accepts connections on port") && got.contains(&port.to_string()), "{got}");
    }
}
