//! Kubernetes' path: a CRI client (tonic + k8s-cri, as kubelet would) -> containerd's CRI
//! plugin -> containerd-shim-hull-v2 -> one microVM per pod. containerd runs in a network
//! namespace of its own with a CNI bridge (198.18.0.0/24), so nothing touches the host network.

use std::time::Duration;

use hull_tests::containerd::{Containerd, IMAGE};
use hull_tests::require_containerd;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

const HANDLER: &str = "hull";

fn cri_config() -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{{dir}}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "{HANDLER}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
    runtime_type = "io.containerd.hull.v2"
"#
    )
}

async fn client(c: &Containerd) -> RuntimeServiceClient<Channel> {
    let path = c.socket.clone();
    let channel = Endpoint::try_from("http://[::]")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

fn pod_config(name: &str, logs: &std::path::Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata { name: name.into(), uid: format!("uid-{name}"), namespace: "default".into(), attempt: 0 }),
        hostname: name.into(),
        log_directory: logs.join(name).to_string_lossy().into_owned(),
        dns_config: Some(DnsConfig { servers: vec!["198.18.0.53".into()], searches: vec!["hull.test".into()], options: vec![] }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption { network: NamespaceMode::Pod as i32, pid: NamespaceMode::Container as i32, ipc: NamespaceMode::Pod as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, command: &[&str], memory_limit: i64) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: (memory_limit > 0).then(|| LinuxContainerResources { memory_limit_in_bytes: memory_limit, ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Pod {
    id: String,
    config: PodSandboxConfig,
}

async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, name: &str, logs: &std::path::Path, c: &Containerd) -> Pod {
    let config = pod_config(name, logs);
    std::fs::create_dir_all(logs.join(name)).expect("log dir");
    let r = rt
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: HANDLER.into() })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", c.log()));
    Pod { id: r.into_inner().pod_sandbox_id, config }
}

async fn start(rt: &mut RuntimeServiceClient<Channel>, pod: &Pod, config: ContainerConfig, c: &Containerd) -> String {
    let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    let r = rt
        .create_container(CreateContainerRequest { pod_sandbox_id: pod.id.clone(), config: Some(config), sandbox_config: Some(pod.config.clone()) })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", c.log()));
    let id = r.into_inner().container_id;
    rt.start_container(StartContainerRequest { container_id: id.clone() }).await.unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", c.log()));
    id
}

async fn exec(rt: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &[&str]) -> (String, i32) {
    let r = rt
        .exec_sync(ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 30 })
        .await
        .expect("ExecSync")
        .into_inner();
    (String::from_utf8_lossy(&r.stdout).into_owned(), r.exit_code)
}

async fn status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
    rt.container_status(ContainerStatusRequest { container_id: id.into(), verbose: false })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("a status")
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pods_are_microvms() {
    require_containerd!();
    let c = Containerd::start_in(&cri_config(), Some("k8s.io")).expect("containerd starts");
    let cni = c.dir.path().join("cni");
    std::fs::create_dir_all(&cni).unwrap();
    std::fs::write(
        cni.join("10-hull.conf"),
        r#"{"cniVersion":"0.4.0","name":"hulltest","type":"bridge","bridge":"hull0","isGateway":true,"ipMasq":false,
            "ipam":{"type":"host-local","dataDir":"CNIDATA","ranges":[[{"subnet":"198.18.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}]}}"#
            .replace("CNIDATA", &c.dir.path().join("cni-ipam").to_string_lossy()),
    )
    .unwrap();
    c.import_busybox().expect("image import");
    let logs = c.dir.path().join("logs");
    let mut rt = client(&c).await;

    // Pod A: one VM, two containers.
    let a = run_pod(&mut rt, "pod-a", &logs, &c).await;
    let c1 = start(&mut rt, &a, container_config("c1", &["sh", "-c", "echo hello from $(hostname) on $(uname -r); exec sleep 1000"], 0), &c).await;
    let c2 = start(&mut rt, &a, container_config("c2", &["sleep", "1000"], 0), &c).await;
    let (out, code) = exec(&mut rt, &c1, &["sh", "-c", "echo exec output; exit 3"]).await;
    assert_eq!((out.as_str(), code), ("exec output\n", 3));
    assert_eq!(status(&mut rt, &c1).await.state, ContainerState::ContainerRunning as i32);
    let boot = |s: &str| s.trim().to_string();
    let (boot1, _) = exec(&mut rt, &c1, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    let (boot2, _) = exec(&mut rt, &c2, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_eq!(boot(&boot1), boot(&boot2), "two containers of a pod share one VM");
    let (resolv, _) = exec(&mut rt, &c1, &["cat", "/etc/resolv.conf"]).await;
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
    assert_eq!(c.pod_processes().iter().filter(|l| l.contains("qemu")).count(), 1, "{:?}", c.pod_processes());

    // Pod B: a second VM; a container over its memory limit is OOMKilled.
    let b = run_pod(&mut rt, "pod-b", &logs, &c).await;
    let b1 = start(&mut rt, &b, container_config("b1", &["sleep", "1000"], 0), &c).await;
    let (boot3, _) = exec(&mut rt, &b1, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_ne!(boot(&boot1), boot(&boot3), "a second pod gets a second VM");
    assert_eq!(c.pod_processes().iter().filter(|l| l.contains("qemu")).count(), 2);
    let hog = start(&mut rt, &b, container_config("hog", &["sh", "-c", "x=$(dd if=/dev/zero bs=1M count=64 2>/dev/null | tr '\\0' a); echo survived"], 16 << 20), &c).await;
    let mut st = status(&mut rt, &hog).await;
    for _ in 0..300 {
        if st.state == ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = status(&mut rt, &hog).await;
    }
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert_eq!(st.exit_code, 137, "{st:?}");

    // Host networking cannot be given to a VM: refused, naming why, and nothing is left.
    let mut host = pod_config("pod-host", &logs);
    if let Some(ns) = host.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()) {
        ns.network = NamespaceMode::Node as i32;
    }
    let err = rt
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(host), runtime_handler: HANDLER.into() })
        .await
        .map(|r| panic!("a host-network pod must be refused: {r:?}\n{}", c.log()))
        .unwrap_err();
    assert!(err.message().contains("host's network namespace"), "{err}");
    assert_eq!(c.pod_processes().iter().filter(|l| l.contains("qemu")).count(), 2, "{:?}", c.pod_processes());

    for pod in [&a, &b] {
        rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() }).await.unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.log()));
        rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.id.clone() }).await.unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", c.log()));
    }
    let gone = tokio::time::timeout(Duration::from_secs(20), async {
        while !c.pod_processes().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "VMs left after the pods were removed: {:?}", c.pod_processes());
}
