//! A client of hull-agent: the generated ttrpc clients plus the stdio stream connections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hull_proto::agent::{self, StdioRequest};
use hull_proto::agent_ttrpc::AgentClient;
use hull_proto::health_ttrpc::HealthClient;
use hull_proto::{forward, hvsock};
use hull_proto::stdio::{StreamHeader, StreamKind};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot connect to the agent at {path:?}: {source}.")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("Cannot connect to the agent at {path:?}: {source}.")]
    Ttrpc { path: PathBuf, source: ttrpc::Error },
    #[error("The agent refused the {call} call: {message}")]
    Rpc { call: &'static str, code: ttrpc::Code, message: String },
    #[error("The {kind} stream of {container} could not be attached: {reason}.")]
    Attach { container: String, kind: StreamKind, reason: String },
    #[error("Cannot open a port-forward to guest port {port}: {source}.")]
    Forward { port: u16, source: std::io::Error },
    #[error("Cannot open a port-forward to guest port {port}: {source}")]
    ForwardRefused { port: u16, source: hull_proto::forward::ForwardError },
    #[error("Reading the output of {container} failed: {source}.")]
    Output { container: String, source: std::io::Error },
}

impl ClientError {
    pub fn rpc(call: &'static str, e: ttrpc::Error) -> ClientError {
        let (code, message) = rpc_status(&e);
        ClientError::Rpc { call, code, message }
    }

    /// The ttrpc status code of a refused call.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The status code and message of a failed call.
pub fn rpc_status(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => (ttrpc::Code::UNKNOWN, other.to_string()),
    }
}

/// A ttrpc context with a deadline generous enough for container creation.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

/// A context without a deadline, for calls that last as long as a process (WaitProcess) or
/// until an event happens (GetOOMEvent).
pub fn ctx_unbounded() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool) -> StdioRequest {
    let mut s = StdioRequest::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

/// What a finished container or exec produced.
#[derive(Debug)]
pub struct RunOutput {
    pub status: i32,
    pub oom_killed: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Where the agent's stream listeners (stdio, port-forward) are.
#[derive(Debug, Clone)]
enum StreamEndpoint {
    /// An agent on this host: PATH.stdio and PATH.forward beside its API socket PATH.
    Unix(PathBuf),
    /// An agent in a VM, behind a hybrid vsock unix socket.
    HybridVsock(PathBuf),
}

/// One of the agent's stream listeners.
#[derive(Debug, Clone, Copy)]
enum StreamListener {
    Stdio,
    Forward,
}

impl StreamEndpoint {
    async fn open(&self, listener: StreamListener) -> std::io::Result<UnixStream> {
        match (self, listener) {
            (StreamEndpoint::Unix(api), StreamListener::Stdio) => UnixStream::connect(hull_proto::stdio_socket_path(api)).await,
            (StreamEndpoint::Unix(api), StreamListener::Forward) => UnixStream::connect(hull_proto::forward_socket_path(api)).await,
            (StreamEndpoint::HybridVsock(uds), StreamListener::Stdio) => hybrid_vsock_connect(uds, hull_proto::STDIO_VSOCK_PORT).await,
            (StreamEndpoint::HybridVsock(uds), StreamListener::Forward) => hybrid_vsock_connect(uds, hull_proto::FORWARD_VSOCK_PORT).await,
        }
    }
}

/// A connection to an agent: on a host (unix socket) or in a VM (hybrid vsock).
pub struct AgentConn {
    pub client: AgentClient,
    pub health: HealthClient,
    streams: StreamEndpoint,
}

/// Opens a stream to guest vsock `port` through a hybrid vsock unix socket (see
/// `hull_proto::hvsock`).
pub async fn hybrid_vsock_connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = connect_socket_file(uds).await?;
    s.write_all(hvsock::connect_line(port).as_bytes()).await?;
    let mut line = Vec::new();
    // Byte by byte: the stream's own bytes follow the reply line.
    while line.last() != Some(&b'\n') {
        if line.len() > hvsock::MAX_LINE {
            return Err(std::io::Error::other(hvsock::HandshakeError::TooLong));
        }
        line.push(s.read_u8().await?);
    }
    hvsock::parse_ok(&line).map_err(std::io::Error::other)?;
    Ok(s)
}

/// Connects to the unix socket that is the file at `path` itself, never to where a symlink there
/// points: the VM's socket directory belongs to the jailed VM process's uid, and a compromised
/// VMM could otherwise swap its socket for a link that sends the shim (root) to any socket on
/// the host, another pod's agent among them. The final component is opened without following
/// it (the directories above it are root's), checked to be a socket, and connected to through
/// its descriptor's /proc path, which names that inode and nothing else.
pub(crate) async fn connect_socket_file(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_NOFOLLOW).open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_socket() {
        let what = if kind.is_symlink() { "a symbolic link" } else { "not a socket" };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is {what}: refusing to connect through it", path.display())));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", file.as_raw_fd())).await
}

impl AgentConn {
    fn from_client(c: ttrpc::r#async::Client, streams: StreamEndpoint) -> AgentConn {
        AgentConn { client: AgentClient::new(c.clone()), health: HealthClient::new(c), streams }
    }

    pub async fn connect_unix(api: &Path) -> Result<AgentConn, ClientError> {
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", api.display()))
            .await
            .map_err(|source| ClientError::Ttrpc { path: api.into(), source })?;
        Ok(AgentConn::from_client(c, StreamEndpoint::Unix(api.into())))
    }

    /// Connects to the agent in a VM through the VM's hybrid vsock socket.
    pub async fn connect_hybrid_vsock(uds: &Path) -> Result<AgentConn, ClientError> {
        let s = hybrid_vsock_connect(uds, hull_proto::AGENT_VSOCK_PORT)
            .await
            .map_err(|source| ClientError::Connect { path: uds.into(), source })?;
        let c = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(s));
        Ok(AgentConn::from_client(c, StreamEndpoint::HybridVsock(uds.into())))
    }

    /// Asks the agent whether it serves.
    pub async fn check(&self) -> Result<bool, ClientError> {
        let r = self
            .health
            .check(ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64), &hull_proto::health::CheckRequest::new())
            .await
            .map_err(|e| ClientError::rpc("Check", e))?;
        Ok(r.status == hull_proto::health::check_response::ServingStatus::SERVING.into())
    }

    pub async fn create(&self, id: &str, spec: &Value, io: StdioRequest) -> Result<i32, ClientError> {
        self.create_on(id, spec, io, Vec::new()).await
    }

    /// Creates a container after the agent mounted `storages` (its rootfs disk, say).
    pub async fn create_on(&self, id: &str, spec: &Value, io: StdioRequest, storages: Vec<agent::Storage>) -> Result<i32, ClientError> {
        self.create_in_pod(id, spec, io, storages, false).await
    }

    /// `create_on`, in the sandbox's PID namespace when `pod_pid`.
    pub async fn create_in_pod(&self, id: &str, spec: &Value, io: StdioRequest, storages: Vec<agent::Storage>, pod_pid: bool) -> Result<i32, ClientError> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = spec.to_string();
        req.stdio = Some(io).into();
        req.storages = storages;
        req.sandbox_pidns = pod_pid;
        let r = self.client.create_container(ctx(), &req).await;
        r.map(|r| r.pid).map_err(|e| ClientError::rpc("CreateContainer", e))
    }

    pub async fn start(&self, id: &str) -> Result<(), ClientError> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("StartContainer", e))
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process: &Value, io: StdioRequest) -> Result<i32, ClientError> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process_json = process.to_string();
        req.stdio = Some(io).into();
        let r = self.client.exec_process(ctx(), &req).await;
        r.map(|r| r.pid).map_err(|e| ClientError::rpc("ExecProcess", e))
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<agent::WaitProcessResponse, ClientError> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client.wait_process(ctx_unbounded(), &req).await.map_err(|e| ClientError::rpc("WaitProcess", e))
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<(), ClientError> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = signal as u32;
        req.all = all;
        self.client.signal_process(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("SignalProcess", e))
    }

    pub async fn remove(&self, id: &str) -> Result<(), ClientError> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout_secs = 2;
        self.client.remove_container(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("RemoveContainer", e))
    }

    /// Creates the pod's sandbox in the guest: hostname, network interfaces and routes.
    pub async fn create_sandbox(&self, req: &agent::CreateSandboxRequest) -> Result<(), ClientError> {
        self.client.create_sandbox(ctx(), req).await.map(drop).map_err(|e| ClientError::rpc("CreateSandbox", e))
    }

    /// Stops every container and powers the VM off (the reply may never come: the VM is gone).
    pub async fn destroy_sandbox(&self, timeout_secs: u32) -> Result<(), ClientError> {
        let mut req = agent::DestroySandboxRequest::new();
        req.timeout_secs = timeout_secs;
        self.client.destroy_sandbox(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("DestroySandbox", e))
    }

    /// The next OOM kill in the guest (waits until one happens).
    pub async fn next_oom_event(&self) -> Result<String, ClientError> {
        let r = self.client.get_oom_event(ctx_unbounded(), &agent::GetOOMEventRequest::new()).await;
        r.map(|e| e.container_id).map_err(|e| ClientError::rpc("GetOOMEvent", e))
    }

    /// The guest pids of a container's processes.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<i32>, ClientError> {
        let mut req = agent::ListProcessesRequest::new();
        req.container_id = id.into();
        let r = self.client.list_processes(ctx(), &req).await.map_err(|e| ClientError::rpc("ListProcesses", e))?;
        Ok(r.processes.iter().map(|p| p.pid).collect())
    }

    pub async fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), ClientError> {
        let mut req = agent::TtyWinResizeRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.rows = rows;
        req.cols = cols;
        self.client.tty_win_resize(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("TtyWinResize", e))
    }

    /// Closes a tty process's stdin (a tty stream carries both directions, so its end is told).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ClientError> {
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client.close_stdin(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("CloseStdin", e))
    }

    /// Applies new resources (an OCI `LinuxResources` as JSON) to a container.
    pub async fn update(&self, id: &str, resources_json: String) -> Result<(), ClientError> {
        let mut req = agent::UpdateContainerRequest::new();
        req.container_id = id.into();
        req.resources_json = resources_json;
        self.client.update_container(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("UpdateContainer", e))
    }

    pub async fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse, ClientError> {
        let mut req = agent::StatsContainerRequest::new();
        req.container_id = id.into();
        self.client.stats_container(ctx(), &req).await.map_err(|e| ClientError::rpc("StatsContainer", e))
    }

    /// Freezes (`pause`) or thaws a container's processes.
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<(), ClientError> {
        if pause {
            let mut req = agent::PauseContainerRequest::new();
            req.container_id = id.into();
            self.client.pause_container(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("PauseContainer", e))
        } else {
            let mut req = agent::ResumeContainerRequest::new();
            req.container_id = id.into();
            self.client.resume_container(ctx(), &req).await.map(drop).map_err(|e| ClientError::rpc("ResumeContainer", e))
        }
    }

    /// Opens one stdio stream of a process; the returned socket carries its bytes.
    pub async fn attach(&self, id: &str, exec_id: &str, kind: StreamKind) -> Result<UnixStream, ClientError> {
        let fail = |reason: String| ClientError::Attach { container: id.into(), kind, reason };
        let mut s = self.streams.open(StreamListener::Stdio).await.map_err(|e| fail(e.to_string()))?;
        let header = StreamHeader { kind, container_id: id.into(), exec_id: exec_id.into() };
        s.write_all(header.to_line().as_bytes()).await.map_err(|e| fail(e.to_string()))?;
        // Byte by byte: nothing after the reply line may be consumed here.
        let mut reply = Vec::new();
        while reply.last() != Some(&b'\n') && reply.len() <= hull_proto::stdio::MAX_HEADER_LEN {
            reply.push(s.read_u8().await.map_err(|e| fail(format!("no reply: {e}")))?);
        }
        match reply.as_slice() {
            b"OK\n" => Ok(s),
            other => Err(fail(String::from_utf8_lossy(other).trim().to_string())),
        }
    }

    /// Opens a TCP connection to `port` on the pod's loopback in the guest (see
    /// `hull_proto::forward`); the returned socket carries its bytes.
    pub async fn forward(&self, port: u16) -> Result<UnixStream, ClientError> {
        let fail = |source: std::io::Error| ClientError::Forward { port, source };
        let mut s = self.streams.open(StreamListener::Forward).await.map_err(fail)?;
        s.write_all(forward::request_line(port).as_bytes()).await.map_err(fail)?;
        // Byte by byte: the stream's own bytes follow the reply line.
        let mut reply = Vec::new();
        while reply.last() != Some(&b'\n') && reply.len() <= forward::MAX_LINE {
            reply.push(s.read_u8().await.map_err(fail)?);
        }
        forward::parse_reply(&reply).map_err(|source| ClientError::ForwardRefused { port, source })?;
        Ok(s)
    }

    /// Creates a container with stdout and stderr, starts it and collects everything.
    pub async fn run(&self, id: &str, spec: &Value) -> Result<RunOutput, ClientError> {
        self.create(id, spec, stdio(false, true, true)).await?;
        let out = self.attach(id, "", StreamKind::Stdout).await?;
        let err = self.attach(id, "", StreamKind::Stderr).await?;
        self.start(id).await?;
        let (stdout, stderr) = tokio::join!(read_all(out), read_all(err));
        let output = |source| ClientError::Output { container: id.into(), source };
        let w = self.wait(id, "").await?;
        Ok(RunOutput {
            status: w.exit_status,
            oom_killed: w.oom_killed,
            stdout: stdout.map_err(output)?,
            stderr: stderr.map_err(output)?,
        })
    }
}

pub async fn read_all(mut s: UnixStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
