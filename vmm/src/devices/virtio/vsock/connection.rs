//! One vsock connection: its state, its credit accounting and its unix stream.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::{CONN_BUF_ALLOC, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUTDOWN_SEND};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host connected and we sent the guest a REQUEST; waiting for its RESPONSE.
    LocalInit,
    Established,
    /// The connection is done; it goes once its RST has been sent.
    Closing,
}

/// Why a connection cannot take the guest's data.
#[derive(Debug, PartialEq, Eq)]
pub enum TxRefused {
    /// The guest sent more than the credit we gave it.
    OverCredit,
    /// The unix stream failed.
    Broken,
}

pub struct Connection {
    pub stream: UnixStream,
    /// Our (host-side) port and the guest's port.
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    /// Control packets to send the guest, oldest first.
    pub pending: VecDeque<u16>,
    /// The connection has readable data to send as RW (and credit to do so).
    pub wants_rw: bool,
    /// Guest data not yet written to the stream (at most CONN_BUF_ALLOC).
    tx_buf: VecDeque<u8>,
    /// Guest-side credit, from the guest's last header.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of guest data written to the stream.
    pub fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host side reached end of file.
    pub host_eof: bool,
    /// The host socket reported a hang-up; unread bytes may remain, read until end of file.
    pub host_hup: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            pending: VecDeque::new(),
            wants_rw: false,
            tx_buf: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            host_hup: false,
        }
    }

    /// A host-initiated connection: the REQUEST goes out first.
    pub fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Connection {
        let mut c = Connection::new(stream, local_port, peer_port, State::LocalInit);
        c.pending.push_back(OP_REQUEST);
        c
    }

    /// A guest-initiated connection whose host socket is connected: answer with a RESPONSE.
    pub fn guest_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Connection {
        let mut c = Connection::new(stream, local_port, peer_port, State::Established);
        c.pending.push_back(OP_RESPONSE);
        c
    }

    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn record_sent(&mut self, n: u32) {
        self.rx_cnt += Wrapping(n);
    }

    /// What we tell the guest in every header.
    pub fn credit(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (CONN_BUF_ALLOC, self.fwd_cnt.0)
    }

    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Takes guest data: written straight through when the stream can take it, buffered
    /// otherwise, refused beyond the credit the guest was given.
    pub fn push_tx(&mut self, data: &[u8]) -> Result<(), TxRefused> {
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(TxRefused::OverCredit);
        }
        self.tx_buf.extend(data);
        self.flush_tx()
    }

    /// Writes buffered guest data to the stream until it would block.
    pub fn flush_tx(&mut self) -> Result<(), TxRefused> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(TxRefused::Broken),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(TxRefused::Broken),
            }
        }
        // Tell the guest about freed space once a quarter of the buffer has drained, so that
        // it never waits on a credit it already has.
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4
            && !self.pending.contains(&OP_CREDIT_UPDATE)
        {
            self.pending.push_back(OP_CREDIT_UPDATE);
        }
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Ends the connection: the guest is told with an RST.
    pub fn reset(&mut self) {
        self.state = State::Closing;
        self.wants_rw = false;
        self.pending.clear();
        self.pending.push_back(OP_RST);
    }

    /// The host side is done sending: tell the guest.
    pub fn host_shutdown(&mut self) {
        if !self.host_eof {
            self.host_eof = true;
            self.wants_rw = false;
            self.pending.push_back(OP_SHUTDOWN);
        }
    }

    /// The flags of the SHUTDOWN we send at the host's end of file: the host sends no more.
    /// It may still receive (a half-closed unix socket); if it was closed outright, the next
    /// write fails and the connection is reset then.
    pub fn shutdown_flags() -> u32 {
        SHUTDOWN_SEND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_follows_the_virtio_rule() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, 1, 2, State::Established);
        c.update_peer_credit(1000, 0);
        assert_eq!(c.peer_free(), 1000);
        c.record_sent(600);
        assert_eq!(c.peer_free(), 400);
        c.update_peer_credit(1000, 500);
        assert_eq!(c.peer_free(), 900);
        // Counters wrap around u32.
        c.rx_cnt = Wrapping(u32::MAX - 10);
        c.update_peer_credit(1000, u32::MAX - 10);
        c.record_sent(20);
        assert_eq!(c.peer_free(), 980);
    }

    #[test]
    fn guest_data_beyond_the_advertised_buffer_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::new(a, 1, 2, State::Established);
        // Nobody reads b: the socket fills, the rest is buffered up to CONN_BUF_ALLOC.
        let chunk = vec![7u8; 64 * 1024];
        let mut accepted = 0usize;
        loop {
            match c.push_tx(&chunk) {
                Ok(()) => accepted += chunk.len(),
                Err(e) => {
                    assert_eq!(e, TxRefused::OverCredit);
                    break;
                }
            }
            assert!(accepted < 64 << 20, "never refused");
        }
        assert!(c.tx_buffered() <= CONN_BUF_ALLOC as usize);
        assert_eq!(c.fwd_cnt.0 as usize + c.tx_buffered(), accepted);
        drop(b);
    }
}
