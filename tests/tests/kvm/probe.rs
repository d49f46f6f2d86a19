//! hull-vmm on this machine's real /dev/kvm with hull's real guest kernel and its virtio-mmio
//! devices. Slow where /dev/kvm is kvm_pvm (every guest kernel instruction is emulated by the
//! host: minutes per boot), so one boot covers every device.
//!
//! The guest (one vCPU, described by hull-vmm's MP table: its interrupts go through the
//! IOAPIC) runs `tests/guest/kvm_probe.rs` as /init, compiled here with rustc (static, std
//! only). It counts its CPUs, reads the read-only disk and is refused a write to it, writes the read-write
//! disk, reads virtio-rng, mounts the virtio-fs share and reads and writes a file there, accepts
//! a host-initiated vsock connection (echo, then a payload checked by length and byte sum),
//! connects to the host over vsock, and reboots: hull-vmm must then exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hull_tests::{binary, guest_image_dir, missing_guest_image};

/// Why the test cannot run here, or None.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root for /dev/kvm".into());
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Some("needs a usable /dev/kvm".into());
    }
    if let Some(why) = missing_guest_image() {
        return Some(why);
    }
    if Command::new("rustc").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("needs rustc to build the probe init".into());
    }
    None
}

macro_rules! require {
    () => {
        if let Some(why) = missing() {
            if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
                panic!("prerequisite missing under HULL_REQUIRE_ALL: {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

/// An initramfs whose /init is the probe.
fn probe_initramfs(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/kvm_probe.rs");
    let init = dir.join("init");
    let out = Command::new("rustc")
        .args(["-O", "-C", "target-feature=+crt-static", "-C", "strip=symbols", "--edition", "2021", "-o"])
        .arg(&init)
        .arg(&src)
        .output()
        .expect("rustc runs");
    assert!(out.status.success(), "building the probe: {}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("initramfs.cpio");
    let mut cpio = hull_guest_image::cpio::CpioWriter::new(std::fs::File::create(&path).expect("create initramfs"));
    cpio.dir("dev", 0o755).expect("cpio");
    cpio.char_dev("dev/console", 0o600, 5, 1).expect("cpio");
    cpio.file("init", 0o755, &std::fs::read(&init).expect("probe binary")).expect("cpio");
    cpio.finish().expect("cpio");
    path
}

fn payload() -> Vec<u8> {
    (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

#[test]
fn linux_guest_uses_every_virtio_mmio_device_and_reboots() {
    require!();
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = probe_initramfs(dir.path());
    let ro = dir.path().join("ro.img");
    let mut disk = b"read-only disk for hull\n".to_vec();
    disk.resize(1 << 20, 0);
    std::fs::write(&ro, &disk).expect("ro disk");
    let rw = dir.path().join("rw.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).expect("rw disk");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("share");
    std::fs::write(share.join("in.txt"), "from the host\n").expect("share file");
    let uds = dir.path().join("vsock.sock");
    let guest_connects = UnixListener::bind(format!("{}_5001", uds.display())).expect("listen for the guest");
    let console = dir.path().join("console.log");

    let cmdline = format!("{} {} loglevel=4", hull_vmm::builder::DEFAULT_CMDLINE, if hull_vmm::builder::host_kvm_is_pvm() { hull_vmm::builder::PVM_COMPAT_CMDLINE } else { "" });
    let started = Instant::now();
    let mut vmm = Command::new(binary("hull-vmm"))
        .args(["boot", "--memory-mib", "256", "--cmdline", &cmdline, "--guest-cid", "3", "--rng"])
        .arg("--kernel")
        .arg(guest_image_dir().join("bzImage"))
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--console")
        .arg(&console)
        .arg("--disk")
        .arg(format!("{},ro,id=probe-ro", ro.display()))
        .arg("--disk")
        .arg(&rw)
        .arg("--share")
        .arg(format!("share={}", share.display()))
        .arg("--vsock-uds")
        .arg(&uds)
        .stderr(Stdio::piped())
        .spawn()
        .expect("hull-vmm starts");
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    // Host-initiated: retry CONNECT until the guest listens (it boots for minutes under PVM).
    let deadline = started + Duration::from_secs(900);
    let mut conn = loop {
        assert!(Instant::now() < deadline, "the guest never listened on vsock 5000; console:\n{}", console_text());
        if let Ok(Some(st)) = vmm.try_wait() {
            panic!("hull-vmm exited early ({st}); console:\n{}", console_text());
        }
        if let Ok(mut s) = UnixStream::connect(&uds) {
            s.write_all(b"connect 5000\n").expect("CONNECT");
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                break (s, r);
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    eprintln!("vsock connected after {:?}", started.elapsed());
    conn.0.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    conn.0.write_all(b"ping\n").expect("write");
    let mut echo = String::new();
    conn.1.read_line(&mut echo).expect("echo");
    assert_eq!(echo, "echo ping\n");
    let data = payload();
    conn.0.write_all(&data).expect("payload");
    conn.0.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    conn.1.read_to_string(&mut answer).expect("answer");
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(answer, format!("{} {sum}\n", data.len()));

    // Guest-initiated: to CID 2 port 5001 = <uds>_5001.
    guest_connects.set_nonblocking(false).expect("blocking");
    let (mut from_guest, _) = guest_connects.accept().expect("the guest connects");
    from_guest.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    let mut line = String::new();
    BufReader::new(from_guest.try_clone().expect("clone")).read_line(&mut line).expect("guest line");
    assert_eq!(line, "hello from the guest\n");
    from_guest.write_all(b"hello guest\n").expect("reply");

    // The guest reboots: hull-vmm exits 0.
    let status = loop {
        if let Some(st) = vmm.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "the guest did not reboot; console:\n{}", console_text());
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut stderr = String::new();
    vmm.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    let text = console_text();
    eprintln!("boot to reboot: {:?}", started.elapsed());
    assert!(status.success(), "hull-vmm exit {status}: {stderr}\nconsole:\n{text}");
    for want in [
        "probe: cpus 1",
        "probe: vda says read-only disk for hull",
        "probe: vda write refused",
        "probe: vdb written",
        "probe: hwrng gave 1 nonzero bytes",
        "probe: share says from the host",
        "probe: share written",
        "probe: host sent 1048576 bytes",
        "probe: host answered hello guest",
        "probe: done",
    ] {
        assert!(text.contains(want), "console lacks {want:?}:\n{text}");
    }
    let written = std::fs::read(&rw).expect("rw disk");
    assert_eq!(&written[..22], b"guest wrote to vdb ok\n");
    assert_eq!(std::fs::read(&ro).expect("ro disk"), disk, "the read-only disk is unchanged");
    assert_eq!(std::fs::read_to_string(share.join("out.txt")).expect("the guest's file"), "written by the guest\n");
}
