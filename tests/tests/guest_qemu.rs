//! hull's guest image under QEMU (TCG here; KVM where KVM can run a stock guest), with hull's
//! vsock device as a vhost-user backend: the guest's hull-agent is PID 1 and answers over vsock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hull_runtime::vm::qemu::{QemuConfig, QemuVm};
use hull_runtime::vm::detect_accel;
use hull_tests::*;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn target_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target
    let exe = std::env::current_exe().expect("test executable");
    exe.ancestors().nth(3).expect("target dir").to_path_buf()
}

fn skip_reason() -> Option<String> {
    if !std::path::Path::new(QEMU).exists() {
        return Some(format!("needs {QEMU} (apt-get install qemu-system-x86)"));
    }
    let manifest = target_dir().join("guest/manifest.json");
    if !manifest.exists() {
        return Some(format!("needs the guest image {} (cargo run -p hull-guest-image -- build)", manifest.display()));
    }
    None
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

fn config(workdir: &std::path::Path) -> QemuConfig {
    let guest = target_dir().join("guest");
    QemuConfig {
        qemu: QEMU.into(),
        vmm: binary("hull-vmm"),
        kernel: guest.join("bzImage"),
        initramfs: guest.join("initramfs.cpio"),
        vcpus: 1,
        memory_mib: 256,
        accel: detect_accel().0,
        guest_cid: 3,
        workdir: workdir.into(),
        cmdline_extra: vec![],
        qemu_extra: vec![],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_agent_answers_over_hull_vsock_and_destroy_powers_off() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut vm = QemuVm::start(config(dir.path())).expect("QEMU starts");
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
    eprintln!("boot to agent ready: {:.2} s ({:?})", ready.as_secs_f64(), detect_accel());

    let mut req = hull_proto::agent::CreateSandboxRequest::new();
    req.sandbox_id = "pod1".into();
    req.hostname = "pod1".into();
    conn.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");

    let mut req = hull_proto::agent::DestroySandboxRequest::new();
    req.timeout_secs = 1;
    conn.client.destroy_sandbox(ctx(), &req).await.expect("DestroySandbox");
    let status = vm.wait_exit(Duration::from_secs(30)).await.expect("the VM exits after DestroySandbox");
    assert!(status.success(), "QEMU exit: {status:?}; console: {}", vm.console_text());
    // The backend serves one VM and leaves with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.backend_exited().is_none() {
        assert!(Instant::now() < deadline, "the vsock backend outlived its VM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
