//! The device probe: a static std-only /init (`tests/guest/kvm_probe.rs`) that exercises a
//! guest's disks, rng, virtio-fs share and vsock (host- and guest-initiated), reports on the
//! console and reboots. The same guest runs under hull-vmm on /dev/kvm (virtio-mmio, devices
//! in process) and under QEMU (virtio-pci, hull's vsock and fs devices as vhost-user
//! backends), so one host-side driver and one set of checks serve both.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Host port the guest connects to (CID 2): reaches `<uds>_5001`.
pub const GUEST_CONNECT_PORT: u32 = 5001;

/// Why the probe cannot be built here, or None.
pub fn missing_rustc() -> Option<String> {
    if Command::new("rustc").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("needs rustc to build the probe init".into());
    }
    None
}

/// The probe /init, built and cached by `guest_program`.
pub fn init_binary() -> PathBuf {
    guest_program("kvm_probe")
}

/// `tests/guest/<name>.rs` built with rustc (static, stripped, std only), cached under
/// target/guest-programs by its source's hash: the L1 KVM host runs its tests under TCG,
/// where rustc would take half a minute, and containers run these without any library.
pub fn guest_program(name: &str) -> PathBuf {
    use sha2::Digest;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest").join(format!("{name}.rs"));
    let text = std::fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let hash: String = sha2::Sha256::digest(&text).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let cache = crate::guest_image_dir().parent().expect("target dir").join("guest-programs");
    let binary = cache.join(format!("{name}-{hash}"));
    if binary.exists() {
        return binary;
    }
    std::fs::create_dir_all(&cache).expect("guest program cache dir");
    let partial = cache.join(format!("{name}-{hash}.{}", std::process::id()));
    let out = Command::new("rustc")
        .args(["-O", "-C", "target-feature=+crt-static", "-C", "strip=symbols", "--edition", "2021", "-o"])
        .arg(&partial)
        .arg(&src)
        .output()
        .expect("rustc runs");
    assert!(out.status.success(), "building {name}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::rename(&partial, &binary).expect("cache the guest program");
    binary
}

/// The probe as /init of an initramfs in `dir`.
pub fn initramfs(dir: &Path) -> PathBuf {
    let init = init_binary();
    let path = dir.join("initramfs.cpio");
    let mut cpio = hull_guest_image::cpio::CpioWriter::new(std::fs::File::create(&path).expect("create initramfs"));
    cpio.dir("dev", 0o755).expect("cpio");
    cpio.char_dev("dev/console", 0o600, 5, 1).expect("cpio");
    cpio.file("init", 0o755, &std::fs::read(&init).expect("probe binary")).expect("cpio");
    cpio.finish().expect("cpio");
    path
}

/// The probe's host-side files: two disks and a shared directory.
pub struct ProbeFiles {
    /// Becomes /dev/vda, attached read-only.
    pub ro: PathBuf,
    pub ro_contents: Vec<u8>,
    /// Becomes /dev/vdb, read-write.
    pub rw: PathBuf,
    /// Shared over virtio-fs; the probe mounts tag `share` or, failing that, `hull`.
    pub share: PathBuf,
}

impl ProbeFiles {
    pub fn create(dir: &Path) -> ProbeFiles {
        let ro = dir.join("ro.img");
        let mut ro_contents = b"read-only disk for hull\n".to_vec();
        ro_contents.resize(1 << 20, 0);
        std::fs::write(&ro, &ro_contents).expect("ro disk");
        let rw = dir.join("rw.img");
        std::fs::write(&rw, vec![0u8; 1 << 20]).expect("rw disk");
        let share = dir.join("share");
        std::fs::create_dir(&share).expect("share");
        std::fs::write(share.join("in.txt"), "from the host\n").expect("share file");
        ProbeFiles { ro, ro_contents, rw, share }
    }

    /// What the guest must have left behind.
    pub fn check(&self) {
        let written = std::fs::read(&self.rw).expect("rw disk");
        assert_eq!(&written[..22], b"guest wrote to vdb ok\n");
        assert_eq!(std::fs::read(&self.ro).expect("ro disk"), self.ro_contents, "the read-only disk is unchanged");
        assert_eq!(std::fs::read_to_string(self.share.join("out.txt")).expect("the guest's file"), "written by the guest\n");
    }
}

/// The bytes each side streams to the other; the probe generates the same sequence.
pub fn payload() -> Vec<u8> {
    (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

/// The VM as the driver sees it: is it still running, and what did its console say.
pub trait ProbeVm {
    /// Some(description) once the VM process has exited.
    fn exited(&mut self) -> Option<String>;
    fn console(&self) -> String;
}

/// Listens where the guest's connections to CID 2 port 5001 arrive; call before boot.
pub fn listen_for_guest(uds: &Path) -> UnixListener {
    UnixListener::bind(format!("{}_{GUEST_CONNECT_PORT}", uds.display())).expect("listen for the guest")
}

/// Drives the probe's vsock steps from the host over the hybrid socket `uds`: connects to
/// guest port 5000 (retrying while the guest boots), checks the echo, sends the payload and
/// checks the guest's count and sum; then accepts the guest's connection on `from_guest`,
/// answers its line and checks the payload the guest streams back.
pub fn drive_vsock(vm: &mut dyn ProbeVm, uds: &Path, from_guest: &UnixListener, deadline: Instant) {
    let started = Instant::now();
    let (mut conn, mut reader) = loop {
        assert!(Instant::now() < deadline, "the guest never listened on vsock 5000; console:\n{}", vm.console());
        if let Some(how) = vm.exited() {
            panic!("the VM exited early ({how}); console:\n{}", vm.console());
        }
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            s.write_all(b"connect 5000\n").expect("CONNECT");
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                break (s, r);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("vsock connected after {:?}", started.elapsed());
    conn.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    conn.write_all(b"ping\n").expect("write");
    let mut echo = String::new();
    reader.read_line(&mut echo).expect("echo");
    assert_eq!(echo, "echo ping\n");
    let data = payload();
    conn.write_all(&data).expect("payload");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    reader.read_to_string(&mut answer).expect("answer");
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(answer, format!("{} {sum}\n", data.len()));

    // Guest-initiated: CID 2 port 5001 = <uds>_5001.
    from_guest.set_nonblocking(true).expect("nonblocking listener");
    let stream = loop {
        match from_guest.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accepting the guest's connection: {e}"),
        }
        assert!(Instant::now() < deadline, "the guest never connected to port {GUEST_CONNECT_PORT}; console:\n{}", vm.console());
        if let Some(how) = vm.exited() {
            panic!("the VM exited ({how}) before the guest connected; console:\n{}", vm.console());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stream.set_nonblocking(false).expect("blocking stream");
    stream.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    let mut from = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    from.read_line(&mut line).expect("guest line");
    assert_eq!(line, "hello from the guest\n");
    (&stream).write_all(b"hello guest\n").expect("reply");
    let mut back = Vec::new();
    from.read_to_end(&mut back).expect("the guest's payload");
    // Closing tells the guest everything arrived; it reboots after that.
    drop(from);
    drop(stream);
    assert!(back == data, "the guest streamed {} bytes that differ from the payload", back.len());
}

/// Waits for the guest to reboot (the VM process exits) and returns how it exited.
pub fn wait_exit(vm: &mut dyn ProbeVm, deadline: Instant) -> String {
    loop {
        if let Some(how) = vm.exited() {
            return how;
        }
        assert!(Instant::now() < deadline, "the guest did not reboot; console:\n{}", vm.console());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The console lines every probe run must show (`cpus` is the vCPU count the VM got).
pub fn check_console(text: &str, cpus: u32) {
    for want in [
        format!("probe: cpus {cpus}"),
        "probe: vda says read-only disk for hull".into(),
        "probe: vda write refused".into(),
        "probe: vdb written".into(),
        "probe: hwrng gave 1 nonzero bytes".into(),
        "probe: share says from the host".into(),
        "probe: share written".into(),
        "probe: host sent 1048576 bytes".into(),
        "probe: host answered hello guest".into(),
        "probe: sent the host 1048576 bytes".into(),
        "probe: done".into(),
    ] {
        assert!(text.contains(&want), "console lacks {want:?}:\n{text}");
    }
}
