//! hull-vmm on a real KVM (here on a VT-x/AMD-V host, else in the L1 KVM host of
//! `hull_tests::kvm_host`) with hull's real guest kernel and every virtio-mmio device.
//!
//! The guest (two vCPUs, described by hull-vmm's MP table: its interrupts go through the
//! IOAPIC, the second CPU comes up by INIT/SIPI) runs `tests/guest/kvm_probe.rs` as /init,
//! compiled here with rustc (static, std only). It counts its CPUs, reads the read-only disk
//! and is refused a write to it, writes the read-write disk, reads virtio-rng, mounts the
//! virtio-fs share and reads and writes a file there, accepts a host-initiated vsock connection
//! (echo, then a payload checked by length and byte sum), connects to the host over vsock (a
//! line each way, then 1 MiB back), and reboots: hull-vmm must then exit 0.
//! tests/tests/guest_qemu.rs runs the same probe under QEMU through hull's vhost-user backends.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hull_tests::{binary, guest_image_dir, missing_guest_image, probe};

/// Why the test cannot run here, or None.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root for /dev/kvm".into());
    }
    if let Some(why) = missing_guest_image() {
        return Some(why);
    }
    probe::missing_rustc()
}

/// hull-vmm as the probe's host driver sees it.
struct Vmm {
    child: std::process::Child,
    console: std::path::PathBuf,
}

impl probe::ProbeVm for Vmm {
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => {
                let mut stderr = String::new();
                self.child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
                Some(if st.success() { "exit 0".into() } else { format!("{st}: {stderr}") })
            }
            _ => None,
        }
    }
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

#[test]
fn linux_guest_uses_every_virtio_mmio_device_and_reboots() {
    hull_tests::skip_if_missing!(missing());
    // Built here, where rustc runs at full speed: the L1 host finds it in target/probe.
    probe::init_binary();
    hull_tests::on_real_kvm!("probe::linux_guest_uses_every_virtio_mmio_device_and_reboots");
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = probe::initramfs(dir.path());
    let files = probe::ProbeFiles::create(dir.path());
    let uds = dir.path().join("vsock.sock");
    let guest_connects = probe::listen_for_guest(&uds);
    let console = dir.path().join("console.log");

    let cmdline = format!("{} loglevel=4", hull_vmm::config::DEFAULT_CMDLINE);
    let started = Instant::now();
    let child = Command::new(binary("hull-vmm"))
        .args(["boot", "--vcpus", "2", "--memory-mib", "256", "--cmdline", &cmdline, "--guest-cid", "3", "--rng"])
        // The bzImage (pods boot the vmlinux out of it): hull-vmm's other kernel loader.
        .arg("--kernel")
        .arg(guest_image_dir().join("bzImage"))
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--console")
        .arg(&console)
        .arg("--disk")
        .arg(format!("{},ro,id=probe-ro", files.ro.display()))
        .arg("--disk")
        .arg(&files.rw)
        .arg("--share")
        .arg(format!("share={}", files.share.display()))
        .arg("--vsock-uds")
        .arg(&uds)
        .stderr(Stdio::piped())
        .spawn()
        .expect("hull-vmm starts");
    let mut vm = Vmm { child, console };

    // Seconds on a real KVM; the L1 host runs everything under TCG.
    let deadline = started + Duration::from_secs(300);
    probe::drive_vsock(&mut vm, &uds, &guest_connects, deadline);
    let how = probe::wait_exit(&mut vm, deadline);
    let text = probe::ProbeVm::console(&vm);
    eprintln!("boot to reboot: {:?}", started.elapsed());
    assert_eq!(how, "exit 0", "hull-vmm must exit 0 when the guest reboots; console:\n{text}");
    probe::check_console(&text, 2);
    files.check();
}
