//! The virtio-fs device driven by a simulated guest driver on real guest memory, serving a real
//! host directory.

use super::*;
use crate::devices::virtio::test_driver::{TestDriver, TestQueue};

const OP_LOOKUP: u32 = 1;
const OP_INIT: u32 = 26;
const IN_HEADER: usize = 40;
const OUT_HEADER: u32 = 16;

fn in_header(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(((IN_HEADER + body.len()) as u32).to_le_bytes());
    v.extend(opcode.to_le_bytes());
    v.extend(unique.to_le_bytes());
    v.extend(nodeid.to_le_bytes());
    v.extend([0u8; 16]); // uid, gid, pid, padding: root
    v.extend(body);
    v
}

struct Fixture {
    drv: TestDriver,
    q: TestQueue,
    dev: FsDevice,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hello"), b"world").expect("write");
        let drv = TestDriver::new();
        let q = drv.queue(0);
        let dev = FsDevice::new(dir.path(), "hull").expect("device");
        Fixture { drv, q, dev, _dir: dir }
    }

    /// Sends `request` with a `reply_len` writable buffer; returns (used length, reply bytes).
    fn call(&mut self, request: &[u8], reply_len: u32) -> (u32, Vec<u8>) {
        let req = self.drv.buffer(request, request.len() as u32);
        let reply = self.drv.buffer(&[], reply_len);
        let head = self.drv.post(&mut self.q, &[(req, request.len() as u32, false), (reply, reply_len, true)]);
        assert!(self.dev.process_queue(&mut self.q.queue, &self.drv.mem));
        let used = self.drv.take_used(&mut self.q);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head);
        (used[0].1, self.drv.read(reply, used[0].1 as usize))
    }

    fn init(&mut self) {
        let mut body = Vec::new();
        for v in [7u32, 31, 128 * 1024, 0] {
            body.extend(v.to_le_bytes());
        }
        let (len, reply) = self.call(&in_header(OP_INIT, 1, 0, &body), 256);
        assert!(len >= OUT_HEADER + 24, "INIT reply too short: {len}");
        assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0, "INIT error");
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 1, "unique echoed");
        assert_eq!(u32::from_le_bytes(reply[16..20].try_into().unwrap()), 7, "FUSE major version");
    }
}

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let f = Fixture::new();
    let c = f.dev.config();
    assert_eq!(&c[..4], b"hull");
    assert!(c[4..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 1);
}

#[test]
fn bad_tags_and_missing_directories_are_refused() {
    let err = |dir: &std::path::Path, tag: &str| FsDevice::new(dir, tag).err().expect("refused").to_string();
    assert!(err(std::path::Path::new("/tmp"), "").contains("tag"));
    assert!(err(std::path::Path::new("/tmp"), &"x".repeat(37)).contains("tag"));
    assert!(err(std::path::Path::new("/nonexistent/share"), "hull").contains("/nonexistent/share"));
}

#[test]
fn init_then_lookup_sees_the_host_file() {
    let mut f = Fixture::new();
    f.init();
    let (len, reply) = f.call(&in_header(OP_LOOKUP, 2, 1, b"hello\0"), 256);
    assert!(len >= OUT_HEADER + 88, "LOOKUP reply too short: {len}");
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0, "LOOKUP error");
    let entry = &reply[OUT_HEADER as usize..];
    assert_ne!(u64::from_le_bytes(entry[0..8].try_into().unwrap()), 0, "node id");
    assert_eq!(u64::from_le_bytes(entry[48..56].try_into().unwrap()), 5, "size of 'world'");

    let (_, reply) = f.call(&in_header(OP_LOOKUP, 3, 1, b"missing\0"), 256);
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), -libc::ENOENT);
}

#[test]
fn malformed_requests_are_rejected_and_the_device_keeps_serving() {
    let mut f = Fixture::new();
    f.init();
    // A header cut short.
    let (len, _) = f.call(&[1, 0, 0, 0], 64);
    assert_eq!(len, 0);
    assert_eq!(f.dev.rejected, 1);
    // A request whose only buffer is device-writable (wrong direction): nothing to read.
    let buf = f.drv.buffer(&[], 128);
    let head = f.drv.post(&mut f.q, &[(buf, 128, true)]);
    f.dev.process_queue(&mut f.q.queue, &f.drv.mem);
    assert_eq!(f.drv.take_used(&mut f.q), vec![(head, 0)]);
    assert_eq!(f.dev.rejected, 2);
    // A header claiming a length far beyond the chain.
    let mut huge = in_header(OP_LOOKUP, 9, 1, b"hello\0");
    huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let (len, _) = f.call(&huge, 256);
    assert!(len == 0 || len >= OUT_HEADER);
    // A descriptor pointing outside guest memory.
    let head = f.drv.post(&mut f.q, &[(u64::MAX - 8, 64, false)]);
    f.dev.process_queue(&mut f.q.queue, &f.drv.mem);
    assert!(f.drv.take_used(&mut f.q).iter().all(|&(h, n)| h == head && n == 0));
    // An unknown opcode is answered, not rejected.
    let (_, reply) = f.call(&in_header(9999, 10, 1, &[]), 64);
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), -libc::ENOSYS);
    // And a good request still works.
    let (_, reply) = f.call(&in_header(OP_LOOKUP, 11, 1, b"hello\0"), 256);
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0);
}
