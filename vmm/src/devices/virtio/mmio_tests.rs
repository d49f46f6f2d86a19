//! The virtio-mmio transport driven register by register the way Linux's virtio_mmio driver
//! does it, with real devices behind it and a real worker thread.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER, VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::EventFd;

use super::block::BlockDevice;
use super::device::{InterruptLine, F_VERSION_1};
use super::mmio::MmioTransport;
use super::rng::RngDevice;
use super::test_driver::{TestDriver, TestQueue, QSIZE};

/// Register offsets are virtio_bindings' `VIRTIO_MMIO_*` (u32).
fn r32(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

fn transport(driver: &TestDriver, device: Arc<Mutex<dyn super::VirtioDevice>>) -> (MmioTransport, EventFd) {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let line = InterruptLine::new(irq.try_clone().unwrap());
    (MmioTransport::new("test", device, driver.mem.clone(), line, None).unwrap(), irq)
}

/// Negotiates `features` and sets up queue 0 at the test queue's addresses.
fn bring_up(t: &mut MmioTransport, q: &TestQueue, features: u64) -> u32 {
    w32(t, VIRTIO_MMIO_STATUS, 0);
    w32(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w32(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let st = r32(t, VIRTIO_MMIO_STATUS);
    if st & FEATURES_OK == 0 {
        return st;
    }
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r32(t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(r32(t, VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(QSIZE));
    w32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
    for (lo, hi, a) in [(VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, q.desc.0), (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, q.avail.0), (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, q.used.0)] {
        w32(t, lo, a as u32);
        w32(t, hi, (a >> 32) as u32);
    }
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    w32(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    r32(t, VIRTIO_MMIO_STATUS)
}

fn wait_irq(irq: &EventFd) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if irq.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn identity_registers_and_feature_words() {
    let d = TestDriver::new();
    let (mut t, _irq) = transport(&d, Arc::new(Mutex::new(RngDevice::default())));
    assert_eq!(r32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_RNG);
    w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), (F_VERSION_1 >> 32) as u32);
    w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 5);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "a queue the device lacks has size 0");
    let mut narrow = [0xaa_u8; 2];
    t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut narrow);
    assert_eq!(narrow, [0, 0], "registers are read 32 bits at a time");
}

#[test]
fn features_without_version_1_or_not_offered_are_refused() {
    let mut d = TestDriver::new();
    let q = d.queue(0x10000);
    let (mut t, _irq) = transport(&d, Arc::new(Mutex::new(RngDevice::default())));
    assert_eq!(bring_up(&mut t, &q, 0) & FEATURES_OK, 0, "legacy drivers are refused");
    assert_eq!(bring_up(&mut t, &q, F_VERSION_1 | 1 << 3) & FEATURES_OK, 0, "feature 3 is not offered");
    let st = bring_up(&mut t, &q, F_VERSION_1);
    assert_eq!(st & DRIVER_OK, DRIVER_OK);
    let _ = d.buffer(&[], 1);
}

#[test]
fn a_notified_queue_is_served_by_the_worker_and_interrupts_the_guest() {
    let mut d = TestDriver::new();
    let mut q = d.queue(0x10000);
    let (mut t, irq) = transport(&d, Arc::new(Mutex::new(RngDevice::default())));
    assert_eq!(bring_up(&mut t, &q, F_VERSION_1) & NEEDS_RESET, 0);
    let buf = d.buffer(&[], 32);
    let head = d.post(&mut q, &[(buf, 32, true)]);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(wait_irq(&irq), "the interrupt fires");
    assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1, "used-ring interrupt");
    assert_eq!(d.take_used(&mut q), vec![(head, 32)]);
    assert_ne!(d.read(buf, 32), vec![0; 32]);
    w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Queue registers are frozen once the device runs.
    w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xdead_0000);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    let buf = d.buffer(&[], 8);
    let head = d.post(&mut q, &[(buf, 8, true)]);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(wait_irq(&irq));
    assert_eq!(d.take_used(&mut q), vec![(head, 8)]);

    // Reset stops the worker: a later notify is not served.
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), 0);
    let buf = d.buffer(&[], 8);
    d.post(&mut q, &[(buf, 8, true)]);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(irq.read().is_err(), "no interrupt after reset");
    assert!(d.take_used(&mut q).is_empty());
}

#[test]
fn a_queue_outside_guest_memory_marks_the_device_broken_not_the_vmm() {
    let mut d = TestDriver::new();
    let mut q = d.queue(0x10000);
    q.desc = vm_memory::GuestAddress(1 << 40);
    let (mut t, irq) = transport(&d, Arc::new(Mutex::new(RngDevice::default())));
    let st = bring_up(&mut t, &q, F_VERSION_1);
    assert_ne!(st & NEEDS_RESET, 0);
    assert!(t.broken());
    assert!(wait_irq(&irq), "config-change interrupt tells the driver");
    assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2);
    let _ = d.buffer(&[], 1);
}

#[test]
fn block_config_space_through_the_transport() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let d = TestDriver::new();
    let (mut t, _irq) = transport(&d, Arc::new(Mutex::new(BlockDevice::open(&path, true, "x").unwrap())));
    assert_eq!(r32(&mut t, VIRTIO_MMIO_CONFIG), 8, "capacity in sectors");
    assert_eq!(r32(&mut t, VIRTIO_MMIO_CONFIG + 4), 0);
    assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) & (1 << 5), 1 << 5, "read-only");
}
