//! The net device on a real tap (needs root and /dev/net/tun; says so and skips otherwise):
//! frames the host kernel sends out of the tap reach the guest's RX buffers, and a frame the
//! guest queues reaches the host kernel.

use std::process::Command;

use super::*;
use crate::devices::virtio::test_driver::TestDriver;

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip runs");
    assert!(st.success(), "ip {args:?}");
}

struct TapGuard(String);
impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP virtio-net tap tests: need root and /dev/net/tun");
        return false;
    }
    true
}

const GUEST_MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x6c, 0x6c, 0x01];

#[test]
fn frames_flow_between_a_real_tap_and_the_queues() {
    if !usable() {
        return;
    }
    let name = format!("hullt{}", std::process::id() % 100_000);
    let tap = Tap::open(&name).expect("tap");
    let _guard = TapGuard(name.clone());
    ip(&["addr", "add", "198.19.77.1/24", "dev", &name]);
    ip(&["link", "set", &name, "up"]);
    let host_mac: [u8; 6] = {
        let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).expect("mac");
        parse_mac(text.trim()).expect("host mac")
    };
    let mut dev = NetDevice::new(Some(tap), GUEST_MAC);
    let mut cfg = [0u8; 6];
    crate::devices::virtio::VirtioDevice::read_config(&dev, 0, &mut cfg);
    assert_eq!(cfg, GUEST_MAC);

    let mut d = TestDriver::new();
    let mut rx = d.queue(0x10000);
    let mut tx = d.queue(0x20000);

    // Host → guest: a UDP send to a neighbour makes the host kernel ARP out of the tap.
    let sock = std::net::UdpSocket::bind("198.19.77.1:0").expect("udp");
    let _ = sock.send_to(b"x", "198.19.77.2:9");
    let buf = d.buffer(&[], 2048);
    let head = d.post(&mut rx, &[(buf, 2048, true)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let used = loop {
        dev.process_rx(&mut rx.queue, &d.mem);
        let used = d.take_used(&mut rx);
        if !used.is_empty() || std::time::Instant::now() > deadline {
            break used;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // IPv6 router solicitations may come first; look for the ARP request among what came.
    assert_eq!(used.first().map(|u| u.0), Some(head), "a frame arrived");
    let got = d.read(buf, used[0].1 as usize);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[..10], &[0u8; 10], "no offloads: an all-zero header");
    let frame = &got[HDR_LEN..];
    assert_eq!(&frame[6..12], &host_mac, "sent by the host side of the tap");

    // Guest → host: an ARP reply for 198.19.77.2 from GUEST_MAC teaches the host kernel.
    let mut reply = vec![0u8; HDR_LEN];
    reply.extend_from_slice(&host_mac);
    reply.extend_from_slice(&GUEST_MAC);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&GUEST_MAC);
    reply.extend_from_slice(&[198, 19, 77, 2]);
    reply.extend_from_slice(&host_mac);
    reply.extend_from_slice(&[198, 19, 77, 1]);
    let b = d.buffer(&reply, reply.len() as u32);
    let head = d.post(&mut tx, &[(b, reply.len() as u32, false)]);
    assert!(dev.process_tx(&mut tx.queue, &d.mem));
    assert_eq!(d.take_used(&mut tx), vec![(head, 0)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = Command::new("ip").args(["neigh", "show", "198.19.77.2", "dev", &name]).output().expect("ip neigh");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("02:68:75:6c:6c:01") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the host never learnt the guest's MAC: {text:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // Hostile TX chains: shorter than a header, or device-writable only; the device goes on.
    let short = d.buffer(&[0; 4], 4);
    let h1 = d.post(&mut tx, &[(short, 4, false)]);
    let w = d.buffer(&[], 64);
    let h2 = d.post(&mut tx, &[(w, 64, true)]);
    assert!(dev.process_tx(&mut tx.queue, &d.mem));
    assert_eq!(d.take_used(&mut tx), vec![(h1, 0), (h2, 0)]);
    assert!(dev.dropped >= 2);
}

#[test]
fn macs_parse_or_are_named() {
    assert_eq!(parse_mac("02:68:75:6c:6c:01").unwrap(), GUEST_MAC);
    assert!(matches!(parse_mac("02:68:75:6c:6c"), Err(NetError::Mac(_))));
    assert!(matches!(parse_mac("zz:68:75:6c:6c:01"), Err(NetError::Mac(_))));
    assert!(matches!(Tap::open(""), Err(NetError::Open { .. })));
}
