//! kubelet's side of containerd's CRI plugin, for the end-to-end suites and benchmarks: a
//! private containerd (in its own network namespace) with a CNI bridge on 198.18.0.0/24, the
//! runtime handlers `hull` (default) and `runc`, the locally built busybox image as sandbox
//! image, and a tonic + k8s-cri client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, IMAGE, PAUSE_IMAGE};

pub const HULL: &str = "hull";
pub const RUNC: &str = "runc";
/// hull with the config `{dir}/hull-snapshots.toml` (`Cri::snapshot_config`): pods restored
/// from snapshots kept in `{dir}/snapshots`.
pub const HULL_SNAPSHOTS: &str = "hull-snapshots";
/// The CNI bridge's subnet; its gateway (the bridge) is .1.
pub const SUBNET: &str = "198.18.0.0/24";
pub const BRIDGE: &str = "hull0";

fn containerd_config() -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{{dir}}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "{HULL}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HULL}]
    runtime_type = "io.containerd.hull.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HULL_SNAPSHOTS}]
    runtime_type = "io.containerd.hull.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HULL_SNAPSHOTS}.options]
      ConfigPath = "{{dir}}/hull-snapshots.toml"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC}]
    runtime_type = "io.containerd.runc.v2"
"#
    )
}

pub struct Cri {
    pub containerd: Containerd,
    pub rt: RuntimeServiceClient<Channel>,
    pub logs: PathBuf,
}

pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
}

pub fn pod_config(name: &str, logs: &Path) -> PodSandboxConfig {
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

/// A container as kubelet asks for it in a pod without `shareProcessNamespace`: kubelet copies
/// the pod's namespace modes into every container's security context (containerd reads the
/// container's, and takes a missing one for `pid: POD`).
pub fn container_config(name: &str, command: &[&str], memory_limit: i64) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: (memory_limit > 0).then(|| LinuxContainerResources { memory_limit_in_bytes: memory_limit, ..Default::default() }),
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption { network: NamespaceMode::Pod as i32, pid: NamespaceMode::Container as i32, ipc: NamespaceMode::Pod as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container command serving "hello from <hostname>" over HTTP on port 8080 (busybox httpd).
pub const HTTPD: &[&str] = &["sh", "-c", "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && exec httpd -f -p 8080 -h /www"];

/// Fetches http://ip:8080/ from container `from`, retrying while the server comes up.
pub async fn fetch(cri: &mut Cri, from: &str, ip: &str) -> String {
    let url = format!("http://{ip}:8080/");
    let mut last = String::new();
    for _ in 0..20 {
        // Not wget -T: Debian's static busybox 1.35 segfaults on it.
        let (out, code) = cri.exec(from, &["timeout", "10", "wget", "-q", "-O", "-", &url]).await;
        if code == 0 {
            return out;
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{from} cannot fetch {url}: {last}");
}

impl Cri {
    /// containerd with the CRI plugin, the CNI bridge config and the busybox image, and a
    /// connected client.
    pub async fn start() -> Result<Cri> {
        let containerd = Containerd::start_in(&containerd_config(), Some("k8s.io"))?;
        let cni = containerd.dir.path().join("cni");
        std::fs::create_dir_all(&cni)?;
        let ipam = containerd.dir.path().join("cni-ipam");
        std::fs::write(
            cni.join("10-hull.conf"),
            format!(
                r#"{{"cniVersion":"0.4.0","name":"hulltest","type":"bridge","bridge":"{BRIDGE}","isGateway":true,"ipMasq":false,
                   "ipam":{{"type":"host-local","dataDir":"{}","ranges":[[{{"subnet":"{SUBNET}"}}]],"routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
                ipam.display()
            ),
        )?;
        containerd.import_busybox()?;
        let logs = containerd.dir.path().join("logs");
        let path = containerd.socket.clone();
        let channel = Endpoint::try_from("http://[::]")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .context("connect to containerd's CRI")?;
        let cri = Cri { containerd, rt: RuntimeServiceClient::new(channel), logs };
        cri.snapshot_config("")?;
        Ok(cri)
    }

    /// Writes the config of the `HULL_SNAPSHOTS` handler: snapshots on, kept in the returned
    /// directory, and `extra` (TOML lines). Each pod's shim reads it as the pod starts.
    pub fn snapshot_config(&self, extra: &str) -> Result<PathBuf> {
        let dir = self.containerd.dir.path();
        let snapshots = dir.join("snapshots");
        std::fs::write(dir.join("hull-snapshots.toml"), format!("snapshots = true\nsnapshot_dir = \"{}\"\n{extra}\n", snapshots.display()))?;
        Ok(snapshots)
    }

    pub async fn run_pod(&mut self, name: &str, handler: &str) -> Pod {
        self.run_pod_with(pod_config(name, &self.logs), handler).await
    }

    pub async fn run_pod_with(&mut self, config: PodSandboxConfig, handler: &str) -> Pod {
        let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        std::fs::create_dir_all(self.logs.join(&name)).expect("log dir");
        let r = self
            .rt
            .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", self.containerd.log()));
        let id = r.into_inner().pod_sandbox_id;
        self.containerd.track_pod(&id);
        Pod { id, config }
    }

    /// How many QEMU processes this client's pods run (each in its jail).
    pub fn qemu_vms(&self) -> usize {
        self.pod_processes().iter().filter(|l| l.contains(" jail --root ") && l.contains("qemu-system")).count()
    }

    /// The host processes of this client's pods (see `Containerd::pod_processes`).
    pub fn pod_processes(&self) -> Vec<String> {
        self.containerd.pod_processes()
    }

    pub async fn start_container(&mut self, pod: &Pod, config: ContainerConfig) -> String {
        let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        let r = self
            .rt
            .create_container(CreateContainerRequest { pod_sandbox_id: pod.id.clone(), config: Some(config), sandbox_config: Some(pod.config.clone()) })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", self.containerd.log()));
        let id = r.into_inner().container_id;
        self.rt
            .start_container(StartContainerRequest { container_id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", self.containerd.log()));
        id
    }

    /// ExecSync: (stdout + stderr, exit code).
    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> (String, i32) {
        let r = self
            .rt
            .exec_sync(ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 60 })
            .await
            .expect("ExecSync")
            .into_inner();
        (String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr), r.exit_code)
    }

    pub async fn status(&mut self, id: &str) -> ContainerStatus {
        self.rt
            .container_status(ContainerStatusRequest { container_id: id.into(), verbose: false })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status")
    }

    /// The pod's IP as CRI reports it (CNI's result).
    pub async fn pod_ip(&mut self, pod: &Pod) -> String {
        let s = self.rt.pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: pod.id.clone(), verbose: false }).await.expect("PodSandboxStatus").into_inner();
        s.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default()
    }

    pub async fn remove_pod(&mut self, pod: &Pod) {
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() })
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", self.containerd.log()));
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.id.clone() })
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", self.containerd.log()));
    }

    /// Waits until no QEMU, backend or shim of the suite is left.
    pub async fn wait_no_pod_processes(&self, limit: Duration) -> Result<(), Vec<String>> {
        let gone = tokio::time::timeout(limit, async {
            while !self.pod_processes().is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        gone.map_err(|_| self.pod_processes())
    }

    /// A command run in containerd's network namespace (where the CNI bridge and the pods'
    /// host-side veths are).
    pub fn in_containerd_netns(&self, cmd: &str) -> String {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.containerd.pid()))
            .args(["sh", "-c", cmd])
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

/// kubelet's side of containerd's streaming server (exec, attach, port-forward): a websocket
/// speaking `v4.channel.k8s.io`, where every binary message starts with its channel number.
/// Exec: 0 stdin, 1 stdout, 2 stderr, 3 status (JSON), 4 terminal size (JSON). Port-forward:
/// 0 data, 1 error, and the server starts each with the port (u16, little endian).
pub struct ChannelStream {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl ChannelStream {
    pub async fn send(&mut self, channel: u8, data: &[u8]) {
        use futures_util::SinkExt;
        let mut message = vec![channel];
        message.extend_from_slice(data);
        self.ws.send(tokio_tungstenite::tungstenite::Message::binary(message)).await.expect("websocket send");
    }

    /// The next non-empty message as (channel, bytes); None once the server closed.
    pub async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match self.ws.next().await? {
                Ok(Message::Binary(b)) if b.len() > 1 => return Some((b[0], b[1..].to_vec())),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Everything received on `channel` until `done` holds for it (or the stream closes, or
    /// `limit` passes), with the last message of `status_channel` if any.
    pub async fn collect(&mut self, channel: u8, status_channel: Option<u8>, limit: Duration, done: impl Fn(&str) -> bool) -> (String, Option<String>) {
        let mut out = Vec::new();
        let mut status = None;
        let _ = tokio::time::timeout(limit, async {
            while let Some((ch, data)) = self.next().await {
                if ch == channel {
                    out.extend_from_slice(&data);
                    if done(&String::from_utf8_lossy(&out)) {
                        return;
                    }
                } else if Some(ch) == status_channel {
                    status = Some(String::from_utf8_lossy(&data).into_owned());
                    return;
                }
            }
        })
        .await;
        (String::from_utf8_lossy(&out).into_owned(), status)
    }
}

impl Cri {
    /// Opens a streaming URL CRI returned. The streaming server listens on containerd's
    /// loopback, inside containerd's network namespace: the socket is made there.
    pub async fn open_stream(&self, url: &str) -> ChannelStream {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let authority = url.strip_prefix("http://").and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("a streaming URL: {url}")).to_string();
        let netns = format!("/proc/{}/ns/net", self.containerd.pid());
        let tcp = std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
            let ns = std::fs::File::open(&netns)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let s = std::net::TcpStream::connect(&authority)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .join()
        .expect("connect thread")
        .unwrap_or_else(|e| panic!("connect to the streaming server {url}: {e}"));
        let tcp = tokio::net::TcpStream::from_std(tcp).expect("tokio stream");
        let mut request = url.replacen("http://", "ws://", 1).into_client_request().expect("websocket request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().expect("header"));
        let (ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap_or_else(|e| panic!("websocket to {url}: {e}\n{}", self.containerd.log()));
        ChannelStream { ws }
    }

    /// Exec through the streaming server (what `kubectl exec` does).
    pub async fn exec_stream(&mut self, id: &str, cmd: &[&str], tty: bool, stdin: bool) -> ChannelStream {
        let r = self
            .rt
            .exec(ExecRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), tty, stdin, stdout: true, stderr: !tty })
            .await
            .unwrap_or_else(|e| panic!("Exec: {e}\n{}", self.containerd.log()))
            .into_inner();
        self.open_stream(&r.url).await
    }

    /// Port-forward to `port` of a pod (what `kubectl port-forward` does).
    pub async fn port_forward(&mut self, pod: &Pod, port: i32) -> ChannelStream {
        let r = self
            .rt
            .port_forward(PortForwardRequest { pod_sandbox_id: pod.id.clone(), port: vec![port] })
            .await
            .unwrap_or_else(|e| panic!("PortForward: {e}\n{}", self.containerd.log()))
            .into_inner();
        self.open_stream(&r.url).await
    }
}
