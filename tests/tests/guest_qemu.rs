//! hull's guest image under QEMU (TCG here; KVM where KVM can run a stock guest), with hull's
//! vsock device as a vhost-user backend: the guest's hull-agent is PID 1 and answers over vsock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hull_runtime::host::Host;
use hull_runtime::hypervisor::{Binaries, Engine, Share, Vm, VmDir, VmSpec};
use hull_runtime::pod::share::{share_storage, FS_TAG};
use hull_proto::stdio::StreamKind;
use hull_tests::*;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn skip_reason() -> Option<String> {
    if !std::path::Path::new(QEMU).exists() {
        return Some(format!("needs {QEMU} (apt-get install qemu-system-x86)"));
    }
    missing_guest_image()
}

macro_rules! require_qemu {
    () => {
        if let Some(why) = skip_reason() {
            assert!(std::env::var_os("HULL_REQUIRE_ALL").is_none(), "prerequisite missing under HULL_REQUIRE_ALL: {why}");
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

fn config() -> VmSpec {
    let guest = guest_image_dir();
    VmSpec {
        kernel: guest.join(hull_runtime::config::GUEST_KERNEL),
        root: hull_runtime::hypervisor::GuestRoot::Image(guest.join(hull_runtime::config::ROOT_IMAGE)),
        vcpus: 1,
        memory_mib: 256,
        guest_cid: 3,
        cmdline_extra: vec![],
        vmm_extra: vec![],
        share: None,
        nic: None,
        log_cap: 1 << 20,
        open_files: 4096,
        jail: None,
    }
}

/// Starts `spec` under QEMU (KVM where the host's KVM runs a stock guest, else TCG) with its
/// files in `dir`.
async fn start(spec: &VmSpec, dir: &std::path::Path) -> Vm {
    let qemu = Engine::Qemu(Host::probe().qemu_accel().0).hypervisor(&Binaries { qemu: QEMU.into(), vmm: binary("hull-vmm") });
    Vm::start(qemu.as_ref(), spec, VmDir::new(dir)).await.expect("QEMU starts")
}

fn share(dir: &std::path::Path) -> Option<Share> {
    Some(Share { tag: FS_TAG.into(), dir: dir.into() })
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_agent_answers_over_hull_vsock_and_destroy_powers_off() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let vm = start(&config(), dir.path()).await;
    let conn = vm.wait_for_agent(Duration::from_secs(90)).await.expect("agent answers");
    let ready = started.elapsed();

    let details = conn
        .client
        .get_guest_details(ctx(), &hull_proto::agent::GetGuestDetailsRequest::new())
        .await
        .expect("GetGuestDetails");
    assert!(details.kernel_release.ends_with("-hull"), "{details:?}");
    assert!(details.init_mode, "the agent is PID 1");
    assert_eq!(details.cgroup_version, 2, "the guest mounts the unified hierarchy");
    assert_eq!(details.online_cpus, 1);
    eprintln!("boot to agent ready: {:.2} s ({:?})", ready.as_secs_f64(), Host::probe().qemu_accel());

    let mut req = hull_proto::agent::CreateSandboxRequest::new();
    req.sandbox_id = "pod1".into();
    req.hostname = "pod1".into();
    conn.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");

    let mut req = hull_proto::agent::DestroySandboxRequest::new();
    req.timeout_secs = 1;
    conn.client.destroy_sandbox(ctx(), &req).await.expect("DestroySandbox");
    let status = vm.wait_exit(Duration::from_secs(30)).await.expect("the VM exits after DestroySandbox");
    assert!(status.success(), "QEMU exit: {status:?}; console: {}", vm.console_tail());
    // The backend serves one VM and leaves with it.
    let statuses = vm.backends_wait(Duration::from_secs(10)).await;
    assert!(statuses.iter().all(Option::is_some), "the vsock backend outlived its VM: {statuses:?}");
}

/// A busybox root filesystem as an ext4 disk image, with `/data` holding `data`.
fn rootfs_disk(dir: &std::path::Path, data: &[u8]) -> PathBuf {
    let root = dir.join("disk-root");
    busybox_rootfs(&root).expect("busybox rootfs");
    std::fs::write(root.join("data"), data).expect("write data");
    let img = dir.join("rootfs.ext4");
    let size_mib = 16 + data.len() / (1 << 20) * 5 / 4;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mkfs.ext4 runs (apt-get install e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    img
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_in_the_guest_and_64_mib_each_way_over_vsock() {
    require_qemu!();
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pseudo_random(64 << 20);
    let img = rootfs_disk(dir.path(), &data);
    let mut cfg = config();
    cfg.vmm_extra = vec![
        "-drive".into(),
        format!("file={},if=none,id=rootfs,format=raw,readonly=on", img.display()),
        "-device".into(),
        "virtio-blk-pci,drive=rootfs".into(),
    ];
    let vm = start(&cfg, dir.path()).await;
    let conn = vm.wait_for_agent(Duration::from_secs(90)).await.expect("agent answers");
    let mut req = hull_proto::agent::CreateSandboxRequest::new();
    req.sandbox_id = "pod-guest".into();
    req.hostname = "pod-guest".into();
    conn.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");

    let disk = |mount_point: &str| {
        let mut s = hull_proto::agent::Storage::new();
        s.source = "/dev/vda".into();
        s.fstype = "ext4".into();
        s.options = vec!["ro".into()];
        s.mount_point = mount_point.into();
        s
    };
    let spec_on = |root: &str, args: &[&str]| {
        let mut spec = default_spec(args, root);
        spec["root"]["readonly"] = serde_json::json!(true);
        spec
    };

    // A container on the disk: its output and exit status come back over vsock.
    let root = "/run/hull/disks/hello";
    let script = "echo hello from $(hostname) on $(uname -r); echo err >&2; exit 3";
    conn.create_on("hello", &spec_on(root, &["sh", "-c", script]), stdio(false, true, true), vec![disk(root)])
        .await
        .expect("create in the guest");
    let out = conn.attach("hello", "", StreamKind::Stdout).await.expect("stdout");
    let err = conn.attach("hello", "", StreamKind::Stderr).await.expect("stderr");
    conn.start("hello").await.expect("start");
    let (out, err) = tokio::join!(read_all(out), read_all(err));
    assert_eq!(out.expect("stdout"), "hello from pod-guest on 6.1.192-hull\n");
    assert_eq!(err.expect("stderr"), "err\n");
    assert_eq!(conn.wait("hello", "").await.expect("wait").exit_status, 3);
    conn.remove("hello").await.expect("remove");

    // 64 MiB guest -> host: the disk's /data, checksummed here.
    let root = "/run/hull/disks/xfer";
    conn.create_on("out", &spec_on(root, &["cat", "/data"]), stdio(false, true, false), vec![disk(root)])
        .await
        .expect("create");
    let mut out = conn.attach("out", "", StreamKind::Stdout).await.expect("stdout");
    let t = Instant::now();
    conn.start("out").await.expect("start");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = out.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, data.len());
    assert_eq!(hasher.finalize()[..], Sha256::digest(&data)[..], "guest -> host checksum");
    assert_eq!(conn.wait("out", "").await.expect("wait").exit_status, 0);
    eprintln!("guest -> host over vsock: {:.1} MB/s", data.len() as f64 / 1e6 / secs);
    conn.remove("out").await.expect("remove");

    // 64 MiB host -> guest: the container checksums its stdin.
    conn.create_on("in", &spec_on(root, &["sha256sum"]), stdio(true, true, false), vec![disk(root)])
        .await
        .expect("create");
    let mut stdin = conn.attach("in", "", StreamKind::Stdin).await.expect("stdin");
    let out = conn.attach("in", "", StreamKind::Stdout).await.expect("stdout");
    conn.start("in").await.expect("start");
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.expect("write stdin");
        stdin.shutdown().await.expect("close stdin");
        data
    });
    let printed = read_all(out).await.expect("read");
    let data = writer.await.expect("writer");
    let secs = t.elapsed().as_secs_f64();
    let expected: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(printed.split_whitespace().next(), Some(expected.as_str()), "host -> guest checksum");
    eprintln!("host -> guest over vsock (with the guest hashing): {:.1} MB/s", data.len() as f64 / 1e6 / secs);
    assert_eq!(conn.wait("in", "").await.expect("wait").exit_status, 0);
    conn.remove("in").await.expect("remove");

    let mut req = hull_proto::agent::DestroySandboxRequest::new();
    req.timeout_secs = 1;
    conn.client.destroy_sandbox(ctx(), &req).await.expect("DestroySandbox");
    let status = vm.wait_exit(Duration::from_secs(30)).await.expect("the VM exits");
    assert!(status.success(), "QEMU exit: {status:?}");
}

/// Where the virtio-fs tests mount the share in the guest.
const SHARE_ROOT: &str = "/run/hull/shared";

/// Boots a VM sharing `share` through hull's virtio-fs and creates sandbox `sandbox_id`.
async fn boot_sharing(dir: &std::path::Path, shared: &std::path::Path, sandbox_id: &str) -> (Vm, AgentConn) {
    let mut cfg = config();
    cfg.share = share(shared);
    let vm = start(&cfg, dir).await;
    let conn = vm.wait_for_agent(Duration::from_secs(90)).await.expect("agent answers");
    let mut req = hull_proto::agent::CreateSandboxRequest::new();
    req.sandbox_id = sandbox_id.into();
    conn.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");
    (vm, conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_on_hull_virtio_fs_reads_and_writes_host_files() {
    require_qemu!();
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().expect("tempdir");
    let share = dir.path().join("share");
    busybox_rootfs(&share).expect("busybox rootfs");
    let data = pseudo_random(8 << 20);
    std::fs::write(share.join("data"), &data).expect("write data");
    let (vm, conn) = boot_sharing(dir.path(), &share, "pod-fs").await;

    let script = "cat /late; sha256sum /data; echo written by the guest > /note; mkdir /made; grep -c virtiofs /proc/mounts";
    conn.create_on("fs", &default_spec(&["sh", "-c", script], SHARE_ROOT), stdio(false, true, true), vec![share_storage(SHARE_ROOT)])
        .await
        .expect("create on the share");
    // Written after the guest mounted the share: the guest must see it anyway.
    std::fs::write(share.join("late"), "late file\n").expect("write late");
    let out = conn.attach("fs", "", StreamKind::Stdout).await.expect("stdout");
    let err = conn.attach("fs", "", StreamKind::Stderr).await.expect("stderr");
    conn.start("fs").await.expect("start");
    let (out, err) = tokio::join!(read_all(out), read_all(err));
    let (out, err) = (out.expect("stdout"), err.expect("stderr"));
    assert_eq!(conn.wait("fs", "").await.expect("wait").exit_status, 0, "stderr: {err}");
    let expected: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"late file"), "{out}");
    assert_eq!(lines.get(1).and_then(|l| l.split_whitespace().next()), Some(expected.as_str()), "{out}");
    assert_eq!(std::fs::read_to_string(share.join("note")).expect("the host sees the guest's file"), "written by the guest\n");
    assert!(share.join("made").is_dir());
    conn.remove("fs").await.expect("remove");

    let mut req = hull_proto::agent::DestroySandboxRequest::new();
    req.timeout_secs = 1;
    conn.client.destroy_sandbox(ctx(), &req).await.expect("DestroySandbox");
    let status = vm.wait_exit(Duration::from_secs(30)).await.expect("the VM exits");
    assert!(status.success(), "QEMU exit: {status:?}");
    let statuses = vm.backends_wait(Duration::from_secs(10)).await;
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_guest_mid_transfer_ends_the_backends_cleanly() {
    require_qemu!();
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let share = dir.path().join("share");
    busybox_rootfs(&share).expect("busybox rootfs");
    let (vm, conn) = boot_sharing(dir.path(), &share, "pod-kill").await;
    // An endless stream: the guest reads through virtio-fs and writes through vsock.
    conn.create_on("flood", &default_spec(&["sh", "-c", "while true; do cat /bin/busybox; done"], SHARE_ROOT), stdio(false, true, false), vec![share_storage(SHARE_ROOT)])
        .await
        .expect("create");
    let mut out = conn.attach("flood", "", StreamKind::Stdout).await.expect("stdout");
    conn.start("flood").await.expect("start");
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0usize;
    while got < 4 << 20 {
        got += out.read(&mut buf).await.expect("read");
    }
    // SIGKILL: the guest disappears mid-transfer.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.vmm_pid() as i32), nix::sys::signal::Signal::SIGKILL).expect("kill QEMU");
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the host side of the stream must end when the guest dies");
    assert!(vm.wait_exit(Duration::from_secs(5)).await.is_some());
    let statuses = vm.backends_wait(Duration::from_secs(10)).await;
    assert!(statuses.iter().all(Option::is_some), "every backend exits when its VM dies: {statuses:?}");
    for log in ["vhost-user-vsock.log", "vhost-user-fs.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap_or_default();
        assert!(!text.contains("panicked"), "{log}: {text}");
    }
    eprintln!("backend exits after the guest was killed: {statuses:?}");
}

/// `hull run --image`: an OCI image tarball (the layout `ctr images export` writes) is
/// unpacked and its Cmd runs in a microVM; arguments after `--` replace the Cmd; a tarball
/// that is no image is refused naming it.
#[test]
fn hull_run_image_runs_the_image_command() {
    require_prerequisites!();
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = dir.path().join("image.tar");
    containerd::oci_image_tar(&dir.path().join("build"), "localhost/hull/run:test", &["sh", "-c", "echo image cmd in $(hostname); exit 4"], &tar).expect("image tarball");
    let hull = binary("hull");
    let out = std::process::Command::new(&hull).args(["run", "--hostname", "from-image", "--image"]).arg(&tar).output().expect("hull runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "image cmd in from-image\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(4));
    let out = std::process::Command::new(&hull).args(["run", "--image"]).arg(&tar).args(["--", "echo", "args win"]).output().expect("hull runs");
    assert_eq!((String::from_utf8_lossy(&out.stdout).as_ref(), out.status.code()), ("args win\n", Some(0)), "{}", String::from_utf8_lossy(&out.stderr));
    let junk = dir.path().join("junk.tar");
    let st = std::process::Command::new("tar").arg("-C").arg(dir.path()).arg("-cf").arg(&junk).arg("build/rootfs/bin/busybox").status().expect("tar");
    assert!(st.success());
    let out = std::process::Command::new(&hull).args(["run", "--image"]).arg(&junk).output().expect("hull runs");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is neither an OCI image layout"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// QEMU as the probe's host driver sees it.
struct ProbeQemu(Vm);

impl probe::ProbeVm for ProbeQemu {
    fn exited(&mut self) -> Option<String> {
        self.0.exited().map(|st| if st.success() { "exit 0".into() } else { st.to_string() })
    }
    fn console(&self) -> String {
        std::fs::read_to_string(self.0.dir().console()).unwrap_or_default()
    }
}

/// The device probe of tests/tests/kvm/probe.rs, here under QEMU (2 vCPUs, virtio-pci) with
/// hull's vsock and virtio-fs devices as vhost-user backends and QEMU's own disks and rng:
/// host-initiated and guest-initiated vsock connections (the guest's goes to `<uds>_5001`
/// through hull's backend), data both ways checked byte for byte, the share read and written;
/// the guest reboots, QEMU exits 0 and so does every backend.
#[test]
fn the_device_probe_under_qemu_through_hull_vhost_user_backends() {
    require_qemu!();
    if let Some(why) = probe::missing_rustc() {
        assert!(std::env::var_os("HULL_REQUIRE_ALL").is_none(), "prerequisite missing under HULL_REQUIRE_ALL: {why}");
        eprintln!("SKIP the_device_probe_under_qemu: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let files = probe::ProbeFiles::create(dir.path());
    let mut cfg = config();
    cfg.root = hull_runtime::hypervisor::GuestRoot::Initramfs(probe::initramfs(dir.path()));
    cfg.vcpus = 2;
    cfg.share = share(&files.share);
    // Fixed PCI slots so the read-only disk is vda.
    cfg.vmm_extra = [
        format!("-drive file={},if=none,id=ro,format=raw,readonly=on", files.ro.display()),
        "-device virtio-blk-pci,drive=ro,addr=0x10".into(),
        format!("-drive file={},if=none,id=rw,format=raw", files.rw.display()),
        "-device virtio-blk-pci,drive=rw,addr=0x11".into(),
        "-device virtio-rng-pci".into(),
    ]
    .iter()
    .flat_map(|a| {
        let (flag, value) = a.split_once(' ').expect("flag and value");
        [flag.to_string(), value.to_string()]
    })
    .collect();
    // The VM's socket directory (`VmDir::run`), made before the VM so the probe listens first.
    std::fs::create_dir(dir.path().join("run")).expect("socket directory");
    let uds = dir.path().join("run/vsock.sock");
    let guest_connects = probe::listen_for_guest(&uds);
    let started = Instant::now();
    // The probe's host side is synchronous; the VM's processes are watched by this runtime.
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut vm = ProbeQemu(rt.block_on(start(&cfg, dir.path())));
    assert_eq!(vm.0.dir().vsock(), uds, "the probe listens where the runtime puts the hybrid socket");
    let deadline = started + Duration::from_secs(180);
    probe::drive_vsock(&mut vm, &uds, &guest_connects, deadline);
    let how = probe::wait_exit(&mut vm, deadline);
    let text = probe::ProbeVm::console(&vm);
    eprintln!("probe under QEMU, boot to reboot: {:?}", started.elapsed());
    assert_eq!(how, "exit 0", "QEMU must exit 0 when the guest reboots; console:\n{text}");
    probe::check_console(&text, 2);
    files.check();
    let statuses = rt.block_on(vm.0.backends_wait(Duration::from_secs(10)));
    assert_eq!(statuses.len(), 2, "vsock and fs backends");
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.success())), "the backends exit 0 with their VM: {statuses:?}");
}
