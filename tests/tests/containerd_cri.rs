//! Kubernetes' path: a CRI client (tonic + k8s-cri, as kubelet would) -> containerd's CRI
//! plugin -> containerd-shim-hull-v2 -> one microVM per pod. containerd runs in a network
//! namespace of its own with a CNI bridge (198.18.0.0/24), so nothing touches the host network.

use std::time::Duration;

use hull_tests::cri::{container_config, pod_config, Cri, HULL};
use hull_tests::require_containerd;
use k8s_cri::v1::*;

#[tokio::test(flavor = "multi_thread")]
async fn cri_pods_are_microvms() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let logs = cri.logs.clone();

    // Pod A: one VM, two containers.
    let a = cri.run_pod("pod-a", HULL).await;
    let c1 = cri.start_container(&a, container_config("c1", &["sh", "-c", "echo hello from $(hostname) on $(uname -r); exec sleep 1000"], 0)).await;
    let c2 = cri.start_container(&a, container_config("c2", &["sleep", "1000"], 0)).await;
    let (out, code) = cri.exec(&c1, &["sh", "-c", "echo exec output; exit 3"]).await;
    assert_eq!((out.as_str(), code), ("exec output\n", 3));
    assert_eq!(cri.status(&c1).await.state, ContainerState::ContainerRunning as i32);
    let boot = |s: &str| s.trim().to_string();
    let (boot1, _) = cri.exec(&c1, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    let (boot2, _) = cri.exec(&c2, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_eq!(boot(&boot1), boot(&boot2), "two containers of a pod share one VM");
    let (resolv, _) = cri.exec(&c1, &["cat", "/etc/resolv.conf"]).await;
    assert!(resolv.contains("nameserver 198.18.0.53") && resolv.contains("search hull.test"), "{resolv}");
    let log = logs.join("pod-a/c1.log");
    let ok = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("stdout F hello from pod-a on ")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "log {log:?}: {:?}", std::fs::read_to_string(&log));
    assert_eq!(cri.qemu_vms(), 1, "{:?}", cri.pod_processes());

    // The hull CLI sees the pod and runs a command in it, with stdin, through the agent.
    let hull = hull_tests::binary("hull");
    let ps = std::process::Command::new(&hull).arg("ps").output().expect("hull ps");
    let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
    let line = ps.lines().find(|l| l.contains(&a.id[..13])).unwrap_or_else(|| panic!("pod {} not in hull ps:\n{ps}", a.id));
    assert!(line.starts_with("k8s.io") && line.contains(&c1[..13]) && line.contains(&c2[..13]), "{line}");
    let mut child = std::process::Command::new(&hull)
        .args(["exec", &a.id[..8], "--", "sh", "-c", "read x; echo got $x in $(hostname); exit 7"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hull exec");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"input\n").expect("write stdin");
    let out = child.wait_with_output().expect("hull exec ends");
    assert_eq!((String::from_utf8_lossy(&out.stdout).as_ref(), out.status.code()), ("got input in pod-a\n", Some(7)));
    let out = std::process::Command::new(&hull).args(["exec", "no-such-pod", "--", "true"]).output().expect("hull exec");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No running hull pod has an id starting with \"no-such-pod\""), "{}", String::from_utf8_lossy(&out.stderr));

    // Pod B: a second VM; a container over its memory limit is OOMKilled.
    let b = cri.run_pod("pod-b", HULL).await;
    let b1 = cri.start_container(&b, container_config("b1", &["sleep", "1000"], 0)).await;
    let (boot3, _) = cri.exec(&b1, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_ne!(boot(&boot1), boot(&boot3), "a second pod gets a second VM");
    assert_eq!(cri.qemu_vms(), 2, "{:?}", cri.pod_processes());
    let hog = cri.start_container(&b, container_config("hog", &["sh", "-c", "x=$(dd if=/dev/zero bs=1M count=64 2>/dev/null | tr '\\0' a); echo survived"], 16 << 20)).await;
    let mut st = cri.status(&hog).await;
    for _ in 0..300 {
        if st.state == ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = cri.status(&hog).await;
    }
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert_eq!(st.exit_code, 137, "{st:?}");

    // Host networking cannot be given to a VM: refused, naming why, and nothing is left.
    let mut host = pod_config("pod-host", &logs);
    if let Some(ns) = host.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()) {
        ns.network = NamespaceMode::Node as i32;
    }
    let err = cri
        .rt
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(host), runtime_handler: HULL.into() })
        .await
        .map(|r| panic!("a host-network pod must be refused: {r:?}\n{}", cri.containerd.log()))
        .unwrap_err();
    assert!(err.message().contains("host's network namespace"), "{err}");
    // Nor the host's IPC namespace.
    let mut host = pod_config("pod-hostipc", &logs);
    if let Some(ns) = host.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()) {
        ns.ipc = NamespaceMode::Node as i32;
    }
    let err = cri
        .rt
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(host), runtime_handler: HULL.into() })
        .await
        .map(|r| panic!("a host-IPC pod must be refused: {r:?}\n{}", cri.containerd.log()))
        .unwrap_err();
    assert!(err.message().contains("host's IPC namespace"), "{err}");
    assert_eq!(cri.qemu_vms(), 2, "{:?}", cri.pod_processes());

    for pod in [&a, &b] {
        cri.remove_pod(pod).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "VMs left after the pods were removed: {left:?}");
}

/// The memory cgroup hierarchy of this host: (its mount, v1?). Every CI host has one.
fn memory_hierarchy() -> (std::path::PathBuf, bool) {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        (v1.into(), true)
    } else {
        ("/sys/fs/cgroup".into(), false)
    }
}

/// The memory cgroup of a process, from /proc/PID/cgroup.
fn memory_cgroup_of(pid: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == "memory")) || l.starts_with("0::"))
        .and_then(|l| l.splitn(3, ':').nth(2))
        .unwrap_or_default()
        .to_string()
}

/// The pod's host processes (the shim, the VMM, its backends): every process whose command
/// line names the sandbox.
fn pod_host_pids(sandbox: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(sandbox) && ["containerd-shim-hull-v2", "qemu-system", "hull-vmm"].iter().any(|p| cmdline.contains(p)) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Issue 14: the pod's VM lives in the pod's cgroup, as the pause would under runc: kubelet's
/// pod cgroup (CRI's cgroup_parent) plus the sandbox id. The shim, the VMM and every backend are
/// there, so a memory limit kubelet sets on the pod's cgroup bounds the whole VM: a guest that
/// touches more is stopped by the host's cgroup (its VMM OOM-killed, the pod's tasks end
/// non-zero), not by the host running out. Removing the pod removes its cgroup.
#[tokio::test(flavor = "multi_thread")]
async fn the_pods_cgroup_holds_its_vm_and_its_memory_limit_bounds_the_guest() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let (memory, v1) = memory_hierarchy();
    let parent_name = format!("hull-test-pod-{}", std::process::id());
    let parent = memory.join(&parent_name);
    std::fs::create_dir_all(&parent).expect("the pod's parent cgroup (kubelet's pod cgroup)");
    if !v1 {
        // As kubelet does: the pod cgroup's children account memory.
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
    }
    let mut config = pod_config("bounded", &cri.logs);
    config.linux.as_mut().expect("linux").cgroup_parent = format!("/{parent_name}");
    let pod = cri.run_pod_with(config, HULL).await;

    let pod_cgroup = format!("/{parent_name}/{}", pod.id);
    let processes = pod_host_pids(&pod.id);
    assert!(processes.len() >= 2, "the shim and the VMM at least: {processes:?}");
    for (pid, cmdline) in &processes {
        assert_eq!(memory_cgroup_of(pid), pod_cgroup, "{cmdline}");
    }

    // kubelet's limit on the pod's cgroup: the memory the pod holds that the host cannot reclaim
    // without swap (anonymous memory and shmem: the guest RAM is a shared memfd the vhost-user
    // backends map), plus 32 MiB; page cache does not count. A limit below what the host
    // cannot reclaim at once is refused (EBUSY): then a little more.
    let stat = std::fs::read_to_string(memory.join(&pod_cgroup[1..]).join("memory.stat")).expect("the pod cgroup's memory.stat");
    let field = |name: &str| stat.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<u64>().ok()).unwrap_or(0);
    let unreclaimable = if v1 { field("total_inactive_anon") + field("total_active_anon") } else { field("anon") + field("shmem") };
    assert!(unreclaimable > 0, "{stat}");
    let limit_file = parent.join(if v1 { "memory.limit_in_bytes" } else { "memory.max" });
    let mut limit = unreclaimable + (32 << 20);
    while let Err(e) = std::fs::write(&limit_file, limit.to_string()) {
        assert!(limit < unreclaimable + (64 << 20), "set the pod cgroup's limit to {limit}: {e}\n{stat}");
        limit += 8 << 20;
    }
    // About 100 MiB touched in the guest (a 64 MiB string built by doubling), within the
    // guest's 256 MiB: only the host's cgroup can stop it.
    let hog = cri
        .start_container(&pod, container_config("hog", &["awk", r#"BEGIN { s = "xxxxxxxx"; while (length(s) < 60000000) s = s s; print "survived", length(s); system("sleep 1000") }"#], 0))
        .await;
    let mut st = cri.status(&hog).await;
    for _ in 0..600 {
        if st.state == ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = cri.status(&hog).await;
    }
    let log = std::fs::read_to_string(cri.logs.join("bounded").join("hog.log")).unwrap_or_default();
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "the guest went past the pod's limit of {limit} bytes and still runs: {log}");
    assert_ne!(st.exit_code, 0, "{st:?}");
    // The kernel's count, as the shim reads it from the pod's cgroup before removing it.
    let said = tokio::time::timeout(Duration::from_secs(20), async {
        while !cri.containerd.log().contains("the pod's cgroup hit its memory limit and the host's OOM killer killed pod VM processes") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(said.is_ok(), "the host's cgroup OOM-killed the VMM, and the shim says so: {st:?}\n{}", cri.containerd.log());

    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "left: {left:?}");
    assert!(!memory.join(&pod_cgroup[1..]).exists(), "the pod's cgroup is removed with the pod");
    std::fs::remove_dir(&parent).expect("nothing of the pod is left under its parent cgroup");
}
