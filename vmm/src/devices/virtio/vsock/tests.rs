//! The vsock device driven by a simulated guest driver on real guest memory, with real unix
//! sockets on the host side.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::test_driver::{TestDriver, TestQueue};

const GUEST_CID: u64 = 3;
const HDR: usize = 44;
const RX_BUF: u32 = 4096;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    /// A packet from the guest's port `src` to host port `dst`.
    fn guest(src: u32, dst: u32, op: u16) -> Hdr {
        Hdr { src_cid: GUEST_CID, dst_cid: HOST_CID, src_port: src, dst_port: dst, type_: TYPE_STREAM, op, buf_alloc: 64 * 1024, ..Default::default() }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HDR);
        v.extend(self.src_cid.to_le_bytes());
        v.extend(self.dst_cid.to_le_bytes());
        v.extend(self.src_port.to_le_bytes());
        v.extend(self.dst_port.to_le_bytes());
        v.extend(self.len.to_le_bytes());
        v.extend(self.type_.to_le_bytes());
        v.extend(self.op.to_le_bytes());
        v.extend(self.flags.to_le_bytes());
        v.extend(self.buf_alloc.to_le_bytes());
        v.extend(self.fwd_cnt.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

struct Fixture {
    drv: TestDriver,
    rx: TestQueue,
    tx: TestQueue,
    dev: VsockDevice,
    uds: PathBuf,
    rx_bufs: HashMap<u16, u64>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let drv = TestDriver::new();
        let rx = drv.queue(0);
        let tx = drv.queue(0x4000);
        let dev = VsockDevice::new(GUEST_CID, &uds).unwrap();
        Fixture { drv, rx, tx, dev, uds, rx_bufs: HashMap::new(), _dir: dir }
    }

    /// The guest sends one packet (header and data in separate descriptors, as Linux does).
    fn send(&mut self, h: Hdr, data: &[u8]) {
        let h = Hdr { len: data.len() as u32, ..h };
        let ha = self.drv.buffer(&h.encode(), HDR as u32);
        let mut descs = vec![(ha, HDR as u32, false)];
        if !data.is_empty() {
            let da = self.drv.buffer(data, data.len() as u32);
            descs.push((da, data.len() as u32, false));
        }
        self.drv.post(&mut self.tx, &descs);
        assert!(self.dev.process_tx(&mut self.tx.queue, &self.drv.mem));
        assert_eq!(self.drv.take_used(&mut self.tx).len(), 1, "the TX buffer comes back");
    }

    /// Runs the host side and delivers what the guest receives within `wait`.
    fn receive(&mut self, wait: Duration) -> Vec<(Hdr, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            self.dev.muxer.process_host_events();
            while self.rx_bufs.len() < 4 {
                let a = self.drv.buffer(&[], RX_BUF);
                let head = self.drv.post(&mut self.rx, &[(a, RX_BUF, true)]);
                self.rx_bufs.insert(head, a);
            }
            self.dev.process_rx(&mut self.rx.queue, &self.drv.mem);
            for (head, len) in self.drv.take_used(&mut self.rx) {
                let addr = self.rx_bufs.remove(&head).expect("a posted buffer");
                let bytes = self.drv.read(addr, len as usize);
                let h = Hdr::decode(&bytes[..HDR]);
                assert_eq!(h.len as usize, bytes.len() - HDR, "used length = header + payload");
                got.push((h, bytes[HDR..].to_vec()));
            }
            if Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn receive_one(&mut self) -> (Hdr, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut v = self.receive(Duration::ZERO);
            if let Some(p) = v.pop() {
                assert!(v.is_empty(), "one packet expected, got {:?} too", headers(&v));
                return p;
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A host client connects to guest port `port`; returns it and the host port after the
    /// handshake.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.receive_one();
        assert_eq!((req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_), (OP_REQUEST, HOST_CID, GUEST_CID, port, TYPE_STREAM));
        self.send(Hdr::guest(port, req.src_port, OP_RESPONSE), &[]);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            host.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(String::from_utf8(line).unwrap(), format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }
}

impl Fixture {
    /// After an attack: a new host connection still carries bytes to the guest.
    fn still_works(&mut self) {
        let (mut host, local) = self.host_connect(4000);
        host.write_all(b"after").unwrap();
        let (h, d) = self.receive_one();
        assert_eq!((h.src_port, h.dst_port, d.as_slice()), (local, 4000, &b"after"[..]));
    }
}

/// Headers only: payloads make unreadable failure messages.
fn headers(v: &[(Hdr, Vec<u8>)]) -> Vec<(u16, u32, u32, u32)> {
    v.iter().map(|(h, _)| (h.op, h.src_port, h.dst_port, h.len)).collect()
}

#[test]
fn host_initiated_connection_carries_bytes_both_ways() {
    let mut f = Fixture::new();
    let (mut host, local) = f.host_connect(1024);
    assert!(local >= 1 << 30);

    host.write_all(b"ping").unwrap();
    let (h, data) = f.receive_one();
    assert_eq!((h.op, h.src_port, h.dst_port, data.as_slice()), (OP_RW, local, 1024, &b"ping"[..]));
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);

    f.send(Hdr::guest(1024, local, OP_RW), b"pong");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // The host closes: the guest is told with a SHUTDOWN, answers RST, the connection goes.
    drop(host);
    let (h, _) = f.receive_one();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    f.send(Hdr::guest(1024, local, OP_RST), &[]);
    assert_eq!(f.dev.muxer.connection_count(), 0);
}

#[test]
fn a_half_closed_host_still_receives_until_the_guest_shuts_down() {
    let mut f = Fixture::new();
    let (mut host, local) = f.host_connect(1024);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = f.receive_one();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND), "the host only stopped sending");
    f.send(Hdr::guest(1024, local, OP_RW), b"answer");
    f.send(Hdr { flags: SHUTDOWN_SEND, ..Hdr::guest(1024, local, OP_SHUTDOWN) }, &[]);
    let mut got = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"answer", "the guest's bytes, then end of file");
    let (h, _) = f.receive_one();
    assert_eq!(h.op, OP_RST, "both directions done: the connection ends");
    assert_eq!(f.dev.muxer.connection_count(), 0);
}

#[test]
fn guest_connections_reach_uds_port_listeners_or_get_reset() {
    let mut f = Fixture::new();
    let mut path = f.uds.clone().into_os_string();
    path.push("_5000");
    let listener = UnixListener::bind(&path).unwrap();

    f.send(Hdr::guest(777, 5000, OP_REQUEST), &[]);
    let (mut server, _) = listener.accept().unwrap();
    let (h, _) = f.receive_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 777));

    f.send(Hdr::guest(777, 5000, OP_RW), b"hello host");
    let mut buf = [0u8; 10];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    server.write_all(b"hello guest").unwrap();
    let (h, data) = f.receive_one();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"hello guest"[..]));

    // Nobody listens on port 6000.
    f.send(Hdr::guest(778, 6000, OP_REQUEST), &[]);
    let (h, _) = f.receive_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6000, 778));

    // The guest shuts down both ways: the host sees end of file and the guest gets an RST.
    f.send(Hdr { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..Hdr::guest(777, 5000, OP_SHUTDOWN) }, &[]);
    let (h, _) = f.receive_one();
    assert_eq!(h.op, OP_RST);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(f.dev.muxer.connection_count(), 0);
}

#[test]
fn the_guest_is_never_sent_more_than_its_credit() {
    let mut f = Fixture::new();
    let (mut host, local) = f.host_connect(2000);
    // The guest says it can buffer 6000 bytes.
    f.send(Hdr { buf_alloc: 6000, ..Hdr::guest(2000, local, OP_CREDIT_UPDATE) }, &[]);
    host.write_all(&vec![1u8; 20_000]).unwrap();
    let got: usize = f.receive(Duration::from_millis(200)).iter().map(|(h, d)| {
        assert_eq!(h.op, OP_RW);
        d.len()
    }).sum();
    assert_eq!(got, 6000, "exactly the credit");

    // The guest consumed 5000 bytes: 5000 more may come.
    f.send(Hdr { buf_alloc: 6000, fwd_cnt: 5000, ..Hdr::guest(2000, local, OP_CREDIT_UPDATE) }, &[]);
    let got: usize = f.receive(Duration::from_millis(200)).iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 5000);

    // A credit request is answered with our credit.
    f.send(Hdr { buf_alloc: 6000, fwd_cnt: 5000, ..Hdr::guest(2000, local, OP_CREDIT_REQUEST) }, &[]);
    let (h, _) = f.receive_one();
    assert_eq!((h.op, h.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_ALLOC));
}

#[test]
fn a_stalled_host_reader_stalls_only_its_own_connection() {
    let mut f = Fixture::new();
    let (stalled, a) = f.host_connect(3000);
    let (mut live, b) = f.host_connect(3001);
    // Fill the stalled connection up to the credit the guest has (our buf_alloc), in packets
    // of 16 KiB; nobody reads it.
    let chunk = vec![9u8; 16 * 1024];
    for _ in 0..(CONN_BUF_ALLOC as usize / chunk.len()) {
        f.send(Hdr::guest(3000, a, OP_RW), &chunk);
    }
    // The other connection still moves data both ways.
    f.send(Hdr::guest(3001, b, OP_RW), b"still here");
    let mut buf = [0u8; 10];
    live.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    live.write_all(b"and back").unwrap();
    let got = f.receive(Duration::from_millis(100));
    assert!(got.iter().any(|(h, d)| h.src_port == b && d == b"and back"), "{:?}", headers(&got));
    // A guest that ignores the credit (keeps sending to a reader that never reads) is reset
    // once the connection's buffer is full, on that connection only: the device's memory per
    // connection stays bounded.
    let mut reset = false;
    for _ in 0..64 {
        f.send(Hdr::guest(3000, a, OP_RW), &chunk);
        let got = f.receive(Duration::ZERO);
        if got.iter().any(|(h, _)| h.op == OP_RST && h.src_port == a) {
            reset = true;
            break;
        }
    }
    assert!(reset, "an over-credit sender is reset");
    assert_eq!(f.dev.muxer.connection_count(), 1);
    drop(stalled);
}

#[test]
fn hostile_guest_packets_are_rejected_and_the_device_keeps_working() {
    let mut f = Fixture::new();
    // Wrong CIDs: dropped without an answer.
    f.send(Hdr { src_cid: 99, ..Hdr::guest(1, 5000, OP_REQUEST) }, &[]);
    f.send(Hdr { dst_cid: 7, ..Hdr::guest(1, 5000, OP_REQUEST) }, &[]);
    assert!(f.receive(Duration::from_millis(20)).is_empty());
    // A datagram type, and a packet for no connection: RST.
    f.send(Hdr { type_: 2, ..Hdr::guest(1, 5000, OP_REQUEST) }, &[]);
    assert_eq!(f.receive_one().0.op, OP_RST);
    f.send(Hdr::guest(1, 5000, OP_RW), b"x");
    assert_eq!(f.receive_one().0.op, OP_RST);
    // An RST for no connection is not answered.
    f.send(Hdr::guest(1, 5000, OP_RST), &[]);
    assert!(f.receive(Duration::from_millis(20)).is_empty());

    // Malformed chains: header in a device-writable descriptor, a too-short header, a length
    // beyond the maximum, a descriptor outside guest memory, a descriptor loop.
    let h = Hdr::guest(1, 5000, OP_REQUEST).encode();
    let ha = f.drv.buffer(&h, HDR as u32);
    f.drv.post(&mut f.tx, &[(ha, HDR as u32, true)]);
    f.drv.post(&mut f.tx, &[(ha, 10, false)]);
    let big = Hdr { len: MAX_PKT_DATA + 1, ..Hdr::guest(1, 5000, OP_RW) }.encode();
    let ba = f.drv.buffer(&big, HDR as u32);
    f.drv.post(&mut f.tx, &[(ba, HDR as u32, false), (ba, 16, false)]);
    f.drv.post(&mut f.tx, &[(1 << 40, HDR as u32, false)]);
    // A chain whose descriptor points at itself, carrying a packet with bad CIDs: walked a
    // bounded number of times, dropped.
    let looped = Hdr { len: 4, dst_cid: 9, ..Hdr::guest(1, 5000, OP_RW) }.encode();
    let la = f.drv.buffer(&looped, HDR as u32);
    f.drv.raw_desc(&f.tx, 15, la, HDR as u32, 1, 15);
    f.drv.make_available(&mut f.tx, 15);
    f.dev.process_tx(&mut f.tx.queue, &f.drv.mem);
    assert_eq!(f.drv.take_used(&mut f.tx).len(), 5, "every bad chain is returned");
    let got = f.receive(Duration::from_millis(20));
    assert!(got.is_empty(), "and none of them did anything: {:?}", headers(&got));

    f.still_works();
}

#[test]
fn an_rx_buffer_too_small_for_a_header_is_returned_empty() {
    let mut f = Fixture::new();
    let mut host = UnixStream::connect(&f.uds).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f.dev.muxer.process_host_events() {
        assert!(Instant::now() < deadline, "the CONNECT line is never read");
        std::thread::sleep(Duration::from_millis(2));
    }
    let tiny = f.drv.buffer(&[], 8);
    f.drv.post(&mut f.rx, &[(tiny, 8, true)]);
    f.dev.process_rx(&mut f.rx.queue, &f.drv.mem);
    assert_eq!(f.drv.take_used(&mut f.rx), vec![(0, 0)], "returned with nothing written");
    // The REQUEST waits for a proper buffer.
    assert_eq!(f.receive_one().0.op, OP_REQUEST);
}

#[test]
fn bytes_written_before_the_host_closes_all_reach_the_guest() {
    let mut f = Fixture::new();
    let (mut host, local) = f.host_connect(7000);
    // The guest can take 8 KiB at a time; the host writes 100 KiB and closes at once.
    f.send(Hdr { buf_alloc: 8192, ..Hdr::guest(7000, local, OP_CREDIT_UPDATE) }, &[]);
    let payload: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    host.write_all(&payload).unwrap();
    drop(host);
    let mut got = Vec::new();
    let mut shutdown = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shutdown {
        assert!(Instant::now() < deadline, "stalled after {} bytes", got.len());
        for (h, d) in f.receive(Duration::from_millis(5)) {
            match h.op {
                OP_RW => got.extend(d),
                OP_SHUTDOWN => shutdown = true,
                op => panic!("unexpected op {op}"),
            }
        }
        // The guest consumed everything so far: it says so.
        let fwd = got.len() as u32;
        f.send(Hdr { buf_alloc: 8192, fwd_cnt: fwd, ..Hdr::guest(7000, local, OP_CREDIT_UPDATE) }, &[]);
    }
    assert_eq!(got.len(), payload.len(), "every byte before the SHUTDOWN");
    assert!(got == payload, "in order");
}

#[test]
fn a_bad_or_overlong_connect_line_closes_the_client_and_tells_the_guest_nothing() {
    let mut f = Fixture::new();
    // One byte longer than the handshake allows (hull_proto::hvsock::MAX_LINE, newline included).
    let overlong = format!("CONNECT {:0>width$}\n", 9, width = hull_proto::hvsock::MAX_LINE - "CONNECT ".len());
    assert_eq!(overlong.len(), hull_proto::hvsock::MAX_LINE + 1);
    for line in ["LISTEN 9\n", overlong.as_str()] {
        let mut host = UnixStream::connect(&f.uds).unwrap();
        host.write_all(line.as_bytes()).unwrap();
        host.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(f.receive(Duration::ZERO).is_empty(), "no packet for the guest after {line:?}");
            match host.read(&mut [0u8; 1]) {
                Ok(0) => break,
                Ok(_) => panic!("the muxer answered {line:?}"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the client of {line:?} is never closed");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("reading after {line:?}: {e}"),
            }
        }
    }
    assert_eq!(f.dev.muxer.connection_count(), 0);
}

/// A hostile guest floods the device: packets for connections that do not exist while it
/// posts no RX buffers, then more connections to a host listener than a VM may have. What the
/// host keeps for it stays bounded: a fixed number of queued RSTs, MAX_CONNECTIONS
/// connections (the rest are reset), and the device keeps working.
#[test]
fn a_flooding_guest_gets_bounded_host_state() {
    let mut f = Fixture::new();
    for port in 0..2_000u32 {
        f.send(Hdr::guest(10_000 + port, 5000, OP_RW), b"x");
    }
    let rsts = f.receive(Duration::from_millis(200));
    assert!(rsts.iter().all(|(h, _)| h.op == OP_RST));
    assert_eq!(rsts.len(), MAX_ORPHAN_RSTS, "queued answers to 2000 packets to nowhere");

    let mut listen = f.uds.clone().into_os_string();
    listen.push("_6000");
    let listener = UnixListener::bind(&listen).unwrap();
    let accepting = std::thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while held.len() < MAX_CONNECTIONS && Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        held
    });
    let extra = 50;
    for port in 0..(MAX_CONNECTIONS + extra) as u32 {
        f.send(Hdr::guest(40_000 + port, 6000, OP_REQUEST), &[]);
    }
    let answers = f.receive(Duration::from_millis(500));
    assert_eq!(f.dev.muxer.connection_count(), MAX_CONNECTIONS);
    let refused = answers.iter().filter(|(h, _)| h.op == OP_RST).count();
    assert_eq!(refused, extra, "connections past the limit are reset: {:?}", &headers(&answers)[..5.min(answers.len())]);
    let held = accepting.join().unwrap();
    assert_eq!(held.len(), MAX_CONNECTIONS);

    // And the device still works.
    drop(held);
    while !f.receive(Duration::from_millis(50)).is_empty() {}
    f.still_works();
}

/// The guest sends faster than the host reads, then closes (SHUTDOWN both ways, as Linux does
/// on close): every byte still reaches the host, then end of file. (A process's last output
/// used to be cut: what the host socket had not taken yet was dropped with the connection.)
#[test]
fn guest_data_queued_for_a_slow_host_survives_the_guests_close() {
    let mut f = Fixture::new();
    let (mut host, local) = f.host_connect(1025);
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    for chunk in data.chunks(8 * 1024) {
        f.send(Hdr::guest(1025, local, OP_RW), chunk);
    }
    f.send(Hdr { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..Hdr::guest(1025, local, OP_SHUTDOWN) }, &[]);
    let got = f.receive(Duration::from_millis(50));
    assert!(got.iter().any(|(h, _)| h.op == OP_RST), "the guest is told the connection ended: {:?}", headers(&got));
    assert_eq!(f.dev.muxer.connection_count(), 0);
    // Only now does the host read.
    let reader = std::thread::spawn(move || {
        host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).map(|_| all)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < deadline {
        f.dev.muxer.process_host_events();
        std::thread::sleep(Duration::from_millis(2));
    }
    let all = reader.join().unwrap().expect("the host reads to end of file");
    assert_eq!(all.len(), data.len(), "bytes the host received");
    assert!(all == data, "and they are the guest's, in order");
}
