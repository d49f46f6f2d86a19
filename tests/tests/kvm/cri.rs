//! A CRI pod on the builtin hypervisor on a real KVM (as `pod`: here on a VT-x/AMD-V host, else
//! in the L1 KVM host), the way kubelet runs one: containerd's CRI plugin with the CNI bridge,
//! the `hull` handler with its default `hypervisor = "auto"`, and a runc pod beside it. The pod
//! network reaches the guest through hull-vmm's own virtio-net on virtio-mmio.

use std::time::Duration;

use hull_tests::cri::{container_config, fetch, Cri, HTTPD, HULL, HULL_SNAPSHOTS, RUNC};
use hull_tests::scenario::step;

#[tokio::test(flavor = "multi_thread")]
async fn a_cri_pod_of_two_containers_on_the_builtin_virtio_net_and_a_runc_pod_reach_each_other() {
    hull_tests::require_containerd!();
    hull_tests::on_real_kvm!("cri::a_cri_pod_of_two_containers_on_the_builtin_virtio_net_and_a_runc_pod_reach_each_other");
    let mut cri = Cri::start().await.expect("containerd with CRI starts");

    step("cri: a hull pod with a server and a sidecar, a runc pod with a server");
    let a = cri.run_pod("kvm-a", HULL).await;
    let server = cri.start_container(&a, container_config("server", HTTPD, 0)).await;
    let sidecar = cri.start_container(&a, container_config("sidecar", &["sleep", "1000"], 0)).await;
    let r = cri.run_pod("kvm-r", RUNC).await;
    let runc = cri.start_container(&r, container_config("runc", HTTPD, 0)).await;
    let (ip_a, ip_r) = (cri.pod_ip(&a).await, cri.pod_ip(&r).await);
    assert!(ip_a.starts_with("198.18.0.") && ip_r.starts_with("198.18.0."), "{ip_a} {ip_r}");

    step("cri: the hull pod is one hull-vmm VM whose eth0 is hull's virtio-net");
    let processes = cri.containerd.pod_processes();
    assert!(processes.iter().any(|p| p.contains("hull-vmm") && p.contains(" boot ")), "auto picks the builtin engine here: {processes:?}");
    assert!(!processes.iter().any(|p| p.contains("qemu-system")), "{processes:?}");
    let (nic, _) = cri.exec(&server, &["readlink", "-f", "/sys/class/net/eth0/device"]).await;
    assert!(nic.contains("virtio-mmio"), "eth0 sits on hull-vmm's virtio-mmio: {nic}");
    let (addr, _) = cri.exec(&sidecar, &["ip", "-4", "addr", "show", "eth0"]).await;
    assert!(addr.contains(&format!("inet {ip_a}/24")), "the sidecar sees the pod's IP: {addr}");
    let (boot_server, _) = cri.exec(&server, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    let (boot_sidecar, _) = cri.exec(&sidecar, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_eq!(boot_server, boot_sidecar, "both containers run in the pod's one VM");

    step("cri: sidecar -> server over the pod's loopback, runc -> hull and hull -> runc over the bridge");
    assert_eq!(fetch(&mut cri, &sidecar, "127.0.0.1").await.trim(), "hello from kvm-a");
    assert_eq!(fetch(&mut cri, &runc, &ip_a).await.trim(), "hello from kvm-a");
    assert_eq!(fetch(&mut cri, &sidecar, &ip_r).await.trim(), "hello from kvm-r");

    step("cri: kubectl port-forward reaches the hull pod's server through hull-vmm's vsock");
    let mut forward = cri.port_forward(&a, 8080).await;
    forward.send(0, b"GET / HTTP/1.0\r\n\r\n").await;
    let (out, _) = forward.collect(0, None, Duration::from_secs(60), |o| o.contains("hello from kvm-a")).await;
    assert!(out.contains("hello from kvm-a"), "the server through the port-forward: {out:?}\n{}", cri.containerd.log());
    drop(forward);

    step("cri: removing both pods leaves nothing");
    for pod in [&a, &r] {
        cri.remove_pod(pod).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "processes left after the pods were removed: {left:?}");
    let links = cri.in_containerd_netns("ip -o link show");
    assert!(!links.contains("veth"), "{links}");
}

/// Builtin-engine pods restored from a snapshot through CRI, with the CNI bridge: the template
/// VM was saved with a NIC of its own MAC and no tap; each restored pod gets its tap, and its
/// agent gives the NIC the MAC CNI chose. Two restored pods: their own hostnames, MACs, CIDs,
/// random numbers and a clock set from the host's, and each serves the other over the bridge.
#[tokio::test(flavor = "multi_thread")]
async fn restored_cri_pods_on_the_builtin_engine_have_their_own_mac_and_reach_each_other() {
    hull_tests::require_containerd!();
    hull_tests::on_real_kvm!("cri::restored_cri_pods_on_the_builtin_engine_have_their_own_mac_and_reach_each_other");
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let store = cri.snapshot_config("hypervisor = \"builtin\"").expect("hull config");
    let mut seen = Vec::new();
    let mut pods = Vec::new();
    for name in ["snap-a", "snap-b"] {
        step(&format!("cri: {name}, restored from the builtin snapshot"));
        let pod = cri.run_pod(name, HULL_SNAPSHOTS).await;
        let web = cri.start_container(&pod, container_config(&format!("{name}-web"), HTTPD, 0)).await;
        let (hostname, _) = cri.exec(&web, &["hostname"]).await;
        let (mac, _) = cri.exec(&web, &["cat", "/sys/class/net/eth0/address"]).await;
        let (random, _) = cri.exec(&web, &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).await;
        let (guest_now, _) = cri.exec(&web, &["date", "+%s"]).await;
        let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
        let skew = guest_now.trim().parse::<i64>().unwrap_or(i64::MAX) - host_now;
        assert_eq!(hostname.trim(), name);
        assert!(skew.abs() <= 2, "{name}'s clock is {skew} s off the host's after the restore");
        let ip = cri.pod_ip(&pod).await;
        seen.push((web, mac.trim().to_string(), random.trim().to_string(), ip));
        pods.push(pod);
    }
    let (a, b) = (&seen[0], &seen[1]);
    assert_ne!(a.1, b.1, "two restored pods have different MACs");
    assert!(![&a.1, &b.1].contains(&&hull_runtime::hypervisor::builtin::TEMPLATE_MAC.to_string()), "each NIC took its pod's MAC: {} {}", a.1, b.1);
    assert_ne!(a.2, b.2, "two restored pods draw different random numbers");
    assert_eq!(fetch(&mut cri, &a.0, &b.3).await.trim(), "hello from snap-b");
    assert_eq!(fetch(&mut cri, &b.0, &a.3).await.trim(), "hello from snap-a");

    let log = cri.containerd.log();
    for pod in &pods {
        let plain = hull_tests::strip_ansi(log.lines().find(|l| l.contains("pod VM ready") && l.contains(&pod.id)).unwrap_or_default());
        assert!(plain.contains("restored=true"), "pod {} was not restored: {plain}\n{log}", pod.id);
    }
    let made: Vec<_> = std::fs::read_dir(&store).expect("snapshot store").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
    assert!(made.iter().any(|n| n.starts_with("builtin-nic-")), "a builtin snapshot with a NIC: {made:?}");

    step("cri: removing both pods leaves nothing");
    for pod in &pods {
        cri.remove_pod(pod).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "processes left after the pods were removed: {left:?}");
}
