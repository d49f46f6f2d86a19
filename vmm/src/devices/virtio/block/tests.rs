//! The block device driven by a simulated driver on real guest memory and a real file.

use super::*;
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::test_driver::{TestDriver, TestQueue};

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend(0u32.to_le_bytes());
    h.extend(sector.to_le_bytes());
    h
}

struct Rig {
    driver: TestDriver,
    q: TestQueue,
    dev: BlockDevice,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn rig(read_only: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut content = vec![0u8; 8 * 512 + 100];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 512) as u8 + 1;
    }
    std::fs::write(&path, content).unwrap();
    let dev = BlockDevice::open(&path, read_only, "hull-disk-0").unwrap();
    let driver = TestDriver::new();
    let q = driver.queue(0x10000);
    Rig { driver, q, dev, _dir: dir, path }
}

impl Rig {
    /// Posts header + data + status and serves it; returns (used len, status, data read back).
    fn request(&mut self, kind: u32, sector: u64, data: &[u8], data_len: u32, data_writable: bool) -> (u32, u8, Vec<u8>) {
        let h = self.driver.buffer(&header(kind, sector), 16);
        let d = self.driver.buffer(data, data_len);
        let s = self.driver.buffer(&[0xff], 1);
        let mut descs = vec![(h, 16, false)];
        if data_len > 0 {
            descs.push((d, data_len, data_writable));
        }
        descs.push((s, 1, true));
        let head = self.driver.post(&mut self.q, &descs);
        assert!(self.dev.process_queue(&mut self.q.queue, &self.driver.mem));
        let used = self.driver.take_used(&mut self.q);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head);
        (used[0].1, self.driver.read(s, 1)[0], self.driver.read(d, data_len as usize))
    }
}

#[test]
fn reads_writes_flushes_and_names_itself() {
    let mut r = rig(false);
    assert_eq!(r.dev.sectors(), 8, "the trailing partial sector is not exposed");
    let mut cfg = [0u8; 8];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 8);
    assert_eq!(r.dev.features() & F_RO, 0);

    let (len, status, data) = r.request(VIRTIO_BLK_T_IN, 2, &[], 1024, true);
    assert_eq!((len, status), (1025, STATUS_OK));
    assert!(data[..512].iter().all(|&b| b == 3) && data[512..].iter().all(|&b| b == 4));

    let payload: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
    let (len, status, _) = r.request(VIRTIO_BLK_T_OUT, 7, &payload, 512, false);
    assert_eq!((len, status), (1, STATUS_OK));
    let (_, status, _) = r.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0, false);
    assert_eq!(status, STATUS_OK);
    let on_disk = std::fs::read(&r.path).unwrap();
    assert_eq!(&on_disk[7 * 512..8 * 512], payload.as_slice());

    let (len, status, id) = r.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20, true);
    assert_eq!((len, status), (21, STATUS_OK));
    assert_eq!(&id[..11], b"hull-disk-0");
    assert!(id[11..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut r = rig(true);
    assert_ne!(r.dev.features() & F_RO, 0);
    let before = std::fs::read(&r.path).unwrap();
    let (_, status, _) = r.request(VIRTIO_BLK_T_OUT, 0, &[9u8; 512], 512, false);
    assert_eq!(status, STATUS_IOERR);
    assert_eq!(std::fs::read(&r.path).unwrap(), before);
    let (_, status, _) = r.request(VIRTIO_BLK_T_IN, 0, &[], 512, true);
    assert_eq!(status, STATUS_OK, "reads still work");
}

#[test]
fn out_of_range_unknown_and_malformed_requests_fail_alone() {
    let mut r = rig(false);
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 8, &[], 512, true).1, STATUS_IOERR, "one past the end");
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 7, &[], 1024, true).1, STATUS_IOERR, "runs past the end");
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, u64::MAX, &[0; 512], 512, false).1, STATUS_IOERR, "offset overflows");
    assert_eq!(r.request(99, 0, &[], 0, false).1, STATUS_UNSUPP);

    // No writable status byte: nothing can be reported; the buffer comes back unused.
    let h = r.driver.buffer(&header(VIRTIO_BLK_T_IN, 0), 16);
    let head = r.driver.post(&mut r.q, &[(h, 16, false)]);
    assert!(r.dev.process_queue(&mut r.q.queue, &r.driver.mem));
    assert_eq!(r.driver.take_used(&mut r.q), vec![(head, 0)]);
    assert_eq!(r.dev.rejected, 1);

    // A data descriptor outside guest memory.
    let h = r.driver.buffer(&header(VIRTIO_BLK_T_IN, 0), 16);
    let s = r.driver.buffer(&[0xff], 1);
    let head = r.driver.post(&mut r.q, &[(h, 16, false), (1 << 40, 512, true), (s, 1, true)]);
    assert!(r.dev.process_queue(&mut r.q.queue, &r.driver.mem));
    assert_eq!(r.driver.take_used(&mut r.q), vec![(head, 0)]);
    assert_eq!(r.dev.rejected, 2);

    // A short header.
    let h = r.driver.buffer(&[0; 8], 8);
    let s = r.driver.buffer(&[0xff], 1);
    r.driver.post(&mut r.q, &[(h, 8, false), (s, 1, true)]);
    assert!(r.dev.process_queue(&mut r.q.queue, &r.driver.mem));
    assert_eq!(r.driver.read(s, 1)[0], STATUS_IOERR);
    r.driver.take_used(&mut r.q);

    // The device still serves good requests.
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, &[], 512, true).1, STATUS_OK);
}

#[test]
fn ids_longer_than_twenty_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    std::fs::write(&path, [0u8; 512]).unwrap();
    assert!(matches!(BlockDevice::open(&path, true, "x".repeat(21).as_str()), Err(BlockError::Id(_))));
    assert!(matches!(BlockDevice::open(&dir.path().join("missing"), true, "a"), Err(BlockError::Open { .. })));
}
