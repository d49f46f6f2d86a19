//! The host side of the vsock device: the unix listener, the host ends of all connections, and
//! the choice of what the guest is sent next.
//!
//! Everything the muxer waits on is in its own epoll set; a transport watches just that one fd
//! (`epoll_fd`) and calls `process_host_events` when it is readable.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use hull_proto::hvsock;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileSlice};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, State};
use super::*;

/// Connections are keyed by (host port, guest port).
type ConnKey = (u32, u32);

/// Host ports for host-initiated connections start here, away from well-known guest ports.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll data of the listener; connection streams use their fd.
const LISTENER_TOKEN: u64 = u64::MAX;

/// A host client that has not yet sent its CONNECT line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A control packet for a connection that no longer (or never did) exist.
#[derive(Debug, Clone, Copy)]
struct OrphanRst {
    local_port: u32,
    peer_port: u32,
}

pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    pending_hosts: HashMap<RawFd, PendingHost>,
    /// Connections with something for the guest, in the order they asked.
    rx_order: VecDeque<ConnKey>,
    orphan_rsts: VecDeque<OrphanRst>,
    /// Connections the guest has ended (RST, or SHUTDOWN both ways) while guest data still
    /// waited for the host socket: written out as the host reads, then closed, so that a host
    /// reader slower than the guest still gets every byte and then end of file.
    draining: HashMap<RawFd, Connection>,
    next_local_port: u32,
    local_ports: HashSet<u32>,
}

impl VsockMuxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<VsockMuxer, VsockError> {
        let listen_err = |source| VsockError::Listen { path: uds_path.into(), source };
        let listener = hull_proto::host_socket::bind_owner_only(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))
            .map_err(VsockError::Epoll)?;
        Ok(VsockMuxer {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            epoll,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            pending_hosts: HashMap::new(),
            rx_order: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            draining: HashMap::new(),
            next_local_port: FIRST_LOCAL_PORT,
            local_ports: HashSet::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The one descriptor a transport must watch for readability.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether anything waits for RX buffers.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_order.is_empty()
    }

    fn watch(&self, fd: RawFd, events: EventSet) {
        let ev = EpollEvent::new(events, fd as u64);
        if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_err() {
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                tracing::error!(fd, error = %e, "vsock: cannot watch a host socket");
            }
        }
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Re-arms a connection's interest: readable while the guest has credit and nothing is
    /// queued for it, writable while guest data waits for the stream.
    fn rearm(&self, key: ConnKey) {
        let Some(c) = self.conns.get(&key) else { return };
        if c.host_hup {
            // A hung-up socket reports HUP at every wait; what it still holds is read as credit
            // allows (see handle_tx), so it leaves the epoll set.
            self.unwatch(c.stream.as_raw_fd());
            return;
        }
        let mut ev = EventSet::empty();
        if c.state == State::Established && !c.wants_rw && !c.host_eof && c.peer_free() > 0 {
            ev |= EventSet::IN;
        }
        if c.tx_buffered() > 0 {
            ev |= EventSet::OUT;
        }
        self.watch(c.stream.as_raw_fd(), ev);
    }

    fn queue_rx(&mut self, key: ConnKey) {
        if !self.rx_order.contains(&key) {
            self.rx_order.push_back(key);
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if self.local_ports.insert(p) {
                return p;
            }
        }
    }

    fn add_conn(&mut self, c: Connection) {
        let key = (c.local_port, c.peer_port);
        self.fd_keys.insert(c.stream.as_raw_fd(), key);
        self.conns.insert(key, c);
        self.queue_rx(key);
        self.rearm(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(mut c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.fd_keys.remove(&fd);
            if c.local_port >= FIRST_LOCAL_PORT {
                self.local_ports.remove(&c.local_port);
            }
            // Within MAX_CONNECTIONS with the live ones: each holds at most CONN_BUF_ALLOC.
            if c.flush_tx().is_ok() && c.tx_buffered() > 0 && self.conns.len() + self.draining.len() < MAX_CONNECTIONS {
                self.watch(fd, EventSet::OUT);
                self.draining.insert(fd, c);
            } else {
                self.unwatch(fd);
            }
            tracing::debug!(local_port = key.0, peer_port = key.1, "vsock: connection closed");
        }
        self.rx_order.retain(|k| *k != key);
    }

    /// A draining connection's socket can take more: write on; drop it (closing the socket,
    /// the host's end of file) once everything is written or the socket broke.
    fn drain(&mut self, fd: RawFd) {
        let Some(c) = self.draining.get_mut(&fd) else { return };
        if c.flush_tx().is_err() || c.tx_buffered() == 0 {
            self.unwatch(fd);
            self.draining.remove(&fd);
        }
    }

    /// Handles whatever the host sockets have to say; returns whether the guest now has
    /// something to receive.
    pub fn process_host_events(&mut self) -> bool {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: epoll_wait failed");
                    return self.has_rx();
                }
            };
            for ev in &events[..n] {
                if ev.data() == LISTENER_TOKEN {
                    self.accept_hosts();
                } else {
                    self.handle_stream_event(ev.data() as RawFd, ev.event_set());
                }
            }
            if n < events.len() {
                return self.has_rx();
            }
        }
    }

    fn accept_hosts(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.pending_hosts.insert(fd, PendingHost { stream, line: Vec::new() });
                    self.watch(fd, EventSet::IN);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn handle_stream_event(&mut self, fd: RawFd, events: EventSet) {
        if self.pending_hosts.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        if self.draining.contains_key(&fd) {
            self.drain(fd);
            return;
        }
        let Some(&key) = self.fd_keys.get(&fd) else { return };
        if events.contains(EventSet::OUT) {
            let result = self.conns.get_mut(&key).map(Connection::flush_tx);
            match result {
                Some(Ok(())) => {
                    if self.conns.get(&key).is_some_and(|c| !c.pending.is_empty()) {
                        self.queue_rx(key);
                    }
                }
                Some(Err(_)) => self.reset_conn(key),
                None => {}
            }
        }
        let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP);
        if let Some(c) = self.conns.get_mut(&key) {
            // Epoll reports a hang-up even when reading was paused for lack of credit: bytes may
            // still be in the socket. Read on; end of file comes from read() returning 0.
            c.host_hup |= hup;
            if (events.contains(EventSet::IN) || hup) && !c.host_eof {
                c.wants_rw = true;
                self.queue_rx(key);
            }
        }
        self.rearm(key);
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending_hosts.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        // Byte by byte: whatever follows the line is the connection's first data. One byte past
        // the longest line is enough to refuse it.
        loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => {
                    p.line.push(byte[0]);
                    if byte[0] == b'\n' || p.line.len() > hvsock::MAX_LINE {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let Some(p) = self.pending_hosts.remove(&fd) else { return };
        self.unwatch(fd);
        match hvsock::parse_connect(&p.line) {
            Ok(port) => {
                let local = self.alloc_local_port();
                tracing::debug!(local_port = local, guest_port = port, "vsock: host connects to guest");
                self.add_conn(Connection::host_initiated(p.stream, local, port));
            }
            Err(e) => {
                tracing::warn!(line = %String::from_utf8_lossy(&p.line), error = %e, "vsock: bad CONNECT line; closing");
            }
        }
    }

    fn reset_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.reset();
            self.queue_rx(key);
        }
    }

    /// Handles one packet the guest sent.
    pub fn handle_tx<B: BitmapSlice>(&mut self, pkt: &VsockPacket<B>) {
        if pkt.src_cid() != self.guest_cid || pkt.dst_cid() != HOST_CID {
            tracing::warn!(src_cid = pkt.src_cid(), dst_cid = pkt.dst_cid(), "vsock: packet with wrong CIDs dropped");
            return;
        }
        let key = (pkt.dst_port(), pkt.src_port());
        if pkt.type_() != TYPE_STREAM {
            self.orphan_rst(key);
            return;
        }
        if pkt.op() == OP_REQUEST {
            self.guest_connect(key, pkt.buf_alloc(), pkt.fwd_cnt());
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if pkt.op() != OP_RST {
                self.orphan_rst(key);
            }
            return;
        };
        c.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        if c.host_hup && !c.host_eof && !c.wants_rw && c.peer_free() > 0 {
            // Not in the epoll set any more: credit is what resumes reading.
            c.wants_rw = true;
            self.queue_rx(key);
        }
        let Some(c) = self.conns.get_mut(&key) else { return };
        match pkt.op() {
            OP_RESPONSE if c.state == State::LocalInit => {
                c.state = State::Established;
                // A fresh socket's buffer always takes this short line; it is ours, not guest
                // data, so it bypasses the credit-counted buffer.
                let ok = hvsock::ok_line(c.local_port);
                if std::io::Write::write_all(&mut c.stream, ok.as_bytes()).is_err() {
                    self.reset_conn(key);
                }
            }
            OP_RW if c.state == State::Established => {
                let mut data = vec![0u8; pkt.len() as usize];
                if let Some(slice) = pkt.data_slice() {
                    slice.copy_to(&mut data[..]);
                }
                if let Err(e) = c.push_tx(&data) {
                    tracing::warn!(local_port = key.0, peer_port = key.1, reason = ?e, "vsock: resetting connection");
                    self.reset_conn(key);
                } else if !c.pending.is_empty() {
                    self.queue_rx(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                c.pending.push_back(OP_CREDIT_UPDATE);
                self.queue_rx(key);
            }
            OP_SHUTDOWN => {
                c.peer_shutdown |= pkt.flags() & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    let _ = c.flush_tx();
                    self.reset_conn(key);
                } else if c.tx_buffered() == 0 && c.peer_shutdown & SHUTDOWN_SEND != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    if c.host_eof {
                        // Neither side sends any more: the connection is done.
                        self.reset_conn(key);
                    }
                }
            }
            OP_RST => {
                // remove_conn writes out (or keeps draining) what the guest sent before.
                self.remove_conn(key);
                return;
            }
            op => {
                tracing::warn!(op, state = ?c.state, "vsock: unexpected op; resetting connection");
                self.reset_conn(key);
            }
        }
        self.rearm(key);
    }

    fn orphan_rst(&mut self, key: ConnKey) {
        if self.orphan_rsts.len() < MAX_ORPHAN_RSTS {
            self.orphan_rsts.push_back(OrphanRst { local_port: key.0, peer_port: key.1 });
        }
    }

    /// A guest connection to host port P goes to the unix socket `<uds>_P`.
    fn guest_connect(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.conns.contains_key(&key) {
            self.reset_conn(key);
            return;
        }
        if self.conns.len() + self.draining.len() >= MAX_CONNECTIONS {
            tracing::warn!(connections = self.conns.len(), draining = self.draining.len(), "vsock: the guest has as many connections as it may; refused");
            self.orphan_rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let mut c = Connection::guest_initiated(stream, key.0, key.1);
                c.update_peer_credit(buf_alloc, fwd_cnt);
                self.add_conn(c);
            }
            Err(e) => {
                tracing::debug!(path = ?path, error = %e, "vsock: guest connection refused");
                self.orphan_rst(key);
            }
        }
    }

    /// Fills one RX buffer with the next packet for the guest. Returns the bytes written
    /// (header and data), or None when nothing is waiting.
    pub fn fill_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<B>) -> Option<u32> {
        if let Some(r) = self.orphan_rsts.pop_front() {
            self.header(pkt, r.local_port, r.peer_port, OP_RST, 0, 0, (0, 0));
            return Some(header_len(pkt));
        }
        while let Some(key) = self.rx_order.pop_front() {
            if let Some(n) = self.fill_from_conn(key, pkt) {
                return Some(n);
            }
        }
        None
    }

    fn fill_from_conn<B: BitmapSlice>(&mut self, key: ConnKey, pkt: &mut VsockPacket<B>) -> Option<u32> {
        let guest_cid = self.guest_cid;
        let c = self.conns.get_mut(&key)?;
        if let Some(op) = c.pending.pop_front() {
            let flags = if op == OP_SHUTDOWN { Connection::shutdown_flags() } else { 0 };
            let credit = c.credit();
            write_header(pkt, guest_cid, key, op, flags, 0, credit);
            let closing = op == OP_RST;
            if closing {
                self.remove_conn(key);
            } else {
                if !c.pending.is_empty() || c.wants_rw {
                    self.rx_order.push_back(key);
                }
                self.rearm(key);
            }
            return Some(header_len(pkt));
        }
        if !c.wants_rw || c.state != State::Established {
            return None;
        }
        let room = pkt.data_slice().map(|s| s.len()).unwrap_or(0).min(MAX_PKT_DATA as usize);
        let want = room.min(c.peer_free() as usize);
        if want == 0 {
            // No credit (or no room): wait for a CREDIT_UPDATE; rearm drops EPOLLIN meanwhile.
            c.wants_rw = false;
            if room == 0 {
                c.wants_rw = true;
                self.rx_order.push_back(key);
            }
            self.rearm(key);
            return None;
        }
        let slice = pkt.data_slice().and_then(|s| s.subslice(0, want).ok())?;
        match read_into(&mut c.stream, &slice) {
            Ok(0) => {
                c.wants_rw = false;
                c.host_shutdown();
                self.rx_order.push_back(key);
                self.fill_from_conn(key, pkt)
            }
            Ok(n) => {
                c.record_sent(n as u32);
                let credit = c.credit();
                write_header(pkt, guest_cid, key, OP_RW, 0, n as u32, credit);
                // More may be readable: try again when the next buffer comes.
                self.rx_order.push_back(key);
                Some(header_len(pkt) + n as u32)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.wants_rw = false;
                self.rearm(key);
                None
            }
            Err(_) => {
                c.reset();
                self.rx_order.push_back(key);
                self.fill_from_conn(key, pkt)
            }
        }
    }

    fn header<B: BitmapSlice>(&self, pkt: &mut VsockPacket<B>, local: u32, peer: u32, op: u16, flags: u32, len: u32, credit: (u32, u32)) {
        write_header(pkt, self.guest_cid, (local, peer), op, flags, len, credit);
    }
}

fn header_len<B: BitmapSlice>(pkt: &VsockPacket<B>) -> u32 {
    pkt.header_slice().len() as u32
}

#[allow(clippy::too_many_arguments)]
fn write_header<B: BitmapSlice>(pkt: &mut VsockPacket<B>, guest_cid: u64, key: ConnKey, op: u16, flags: u32, len: u32, credit: (u32, u32)) {
    pkt.set_src_cid(HOST_CID)
        .set_dst_cid(guest_cid)
        .set_src_port(key.0)
        .set_dst_port(key.1)
        .set_type(TYPE_STREAM)
        .set_op(op)
        .set_flags(flags)
        .set_len(len)
        .set_buf_alloc(credit.0)
        .set_fwd_cnt(credit.1);
}

/// Reads from the stream straight into guest memory.
fn read_into<B: BitmapSlice>(stream: &mut UnixStream, slice: &VolatileSlice<B>) -> std::io::Result<usize> {
    let mut s = slice.clone();
    loop {
        match stream.read_volatile(&mut s) {
            Err(vm_memory::VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => continue,
            Err(vm_memory::VolatileMemoryError::IOError(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e)),
            Ok(n) => return Ok(n),
        }
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
