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
    assert_eq!(cri.containerd.pod_processes().iter().filter(|l| l.contains("qemu")).count(), 1, "{:?}", cri.containerd.pod_processes());

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
    assert_eq!(cri.containerd.pod_processes().iter().filter(|l| l.contains("qemu")).count(), 2);
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
    assert_eq!(cri.containerd.pod_processes().iter().filter(|l| l.contains("qemu")).count(), 2, "{:?}", cri.containerd.pod_processes());

    for pod in [&a, &b] {
        cri.remove_pod(pod).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "VMs left after the pods were removed: {left:?}");
}
