//! Pod lifecycles through CRI, for what they leave behind: a pod whose VMM is killed under it,
//! and 20 pod create/remove cycles, must leave no process, mount, socket, state directory,
//! network namespace, veth or tap.

use std::collections::BTreeSet;
use std::time::Duration;

use hull_tests::cri::{container_config, Cri, HULL};
use hull_tests::require_containerd;
use k8s_cri::v1::ContainerState;

const STATE: &str = "/run/hull/shim/k8s.io";

fn dir_entries(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect()).unwrap_or_default()
}

fn hull_mounts() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().filter(|l| l.contains(STATE)).map(str::to_string).collect()
}

/// What a pod may leave on the host, to compare before and after.
#[derive(Debug, PartialEq)]
struct Leftovers {
    shim_sockets: BTreeSet<String>,
    netns: BTreeSet<String>,
    state: BTreeSet<String>,
    mounts: Vec<String>,
}

fn leftovers() -> Leftovers {
    Leftovers { shim_sockets: dir_entries("/run/containerd/s"), netns: dir_entries("/var/run/netns"), state: dir_entries(STATE), mounts: hull_mounts() }
}

async fn wait_exited(cri: &mut Cri, id: &str) -> k8s_cri::v1::ContainerStatus {
    let mut st = cri.status(id).await;
    for _ in 0..200 {
        if st.state == ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = cri.status(id).await;
    }
    st
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_vmm_and_twenty_cycles_leave_nothing_behind() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let before = leftovers();

    // The VMM dies under a running pod: its containers exit non-zero, the pod can be removed.
    let pod = cri.run_pod("doomed", HULL).await;
    let c1 = cri.start_container(&pod, container_config("c1", &["sleep", "1000"], 0)).await;
    let c2 = cri.start_container(&pod, container_config("c2", &["sleep", "1000"], 0)).await;
    let qemu: Vec<i32> = cri
        .containerd
        .pod_processes()
        .iter()
        .filter(|l| l.contains("qemu-system") && l.contains(&pod.id))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(qemu.len(), 1, "{:?}", cri.containerd.pod_processes());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu[0]), nix::sys::signal::Signal::SIGKILL).expect("kill QEMU");
    for id in [&c1, &c2] {
        let st = wait_exited(&mut cri, id).await;
        assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
        assert_ne!(st.exit_code, 0, "{st:?}");
    }
    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "processes left after the pod with the killed VMM was removed: {left:?}");
    assert_eq!(leftovers(), before, "left behind by the pod whose VMM was killed");

    // 20 pod create/remove cycles, each with a container that ran and a network.
    for i in 0..20 {
        let pod = cri.run_pod(&format!("cycle-{i}"), HULL).await;
        let id = cri.start_container(&pod, container_config("c", &["sh", "-c", "ip -4 addr show eth0 | grep -q 198.18.0."], 0)).await;
        let st = wait_exited(&mut cri, &id).await;
        assert_eq!((st.state, st.exit_code), (ContainerState::ContainerExited as i32, 0), "cycle {i}: {st:?}");
        cri.remove_pod(&pod).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "processes left after 20 cycles: {left:?}");
    assert_eq!(leftovers(), before, "left behind by 20 cycles");
    let links = cri.in_containerd_netns("ip -o link show");
    assert!(!links.contains("veth"), "veths left on the bridge: {links}");
    let shims = std::process::Command::new("pgrep").args(["-f", "containerd-shim-hull-v2 -namespace k8s.io"]).output().expect("pgrep");
    assert!(shims.stdout.is_empty(), "shims left: {}", String::from_utf8_lossy(&shims.stdout));
}
