//! Helpers shared by hull's integration suites: a real `hull-agent` on a unix socket, a busybox
//! root filesystem built from Debian's busybox-static, OCI specs, and stdio streams.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_proto::agent::{self, StdioRequest};
use hull_proto::agent_ttrpc::AgentClient;
use hull_proto::health_ttrpc::HealthClient;
use hull_proto::stdio::{StreamHeader, StreamKind};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A ttrpc context with a generous deadline.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

/// Why a suite cannot run here, or None. Tests print this in one line and return.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, cgroups, mounts)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("needs {BUSYBOX} (apt-get install busybox-static)"));
    }
    None
}

/// Skips the calling test with one line saying why, unless HULL_REQUIRE_ALL is set (CI), where
/// a missing part fails the test instead.
#[macro_export]
macro_rules! require_prerequisites {
    () => {
        if let Some(why) = $crate::missing_prerequisite() {
            if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
                panic!("prerequisite missing under HULL_REQUIRE_ALL: {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

pub const BUSYBOX: &str = "/bin/busybox";

/// The hull binaries built beside the test executable (target/<profile>/).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    exe.parent().and_then(Path::parent).map(|d| d.join(name)).expect("target dir")
}

/// Builds a busybox root filesystem in `dir`: /bin/busybox and a link per applet.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "home/user", "var", "run"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(BUSYBOX, dir.join("bin/busybox")).context("copy busybox")?;
    let list = Command::new(BUSYBOX).arg("--list").output().context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = dir.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            symlink("busybox", link)?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
    Ok(())
}

/// An OCI runtime spec like `runc spec` writes: new pid, mount, ipc, uts and network
/// namespaces, the usual mounts, default capabilities, masked and read-only /proc paths.
pub fn oci_spec(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
        "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "hull-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// An OCI process object for ExecProcess.
pub fn oci_process(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/"
    })
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool) -> StdioRequest {
    let mut s = StdioRequest::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

/// The status code and message of a failed call.
pub fn rpc_error(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => (ttrpc::Code::UNKNOWN, other.to_string()),
    }
}

/// What a finished container or exec produced.
#[derive(Debug)]
pub struct RunOutput {
    pub status: i32,
    pub oom_killed: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A hull-agent serving on a unix socket in its own temporary directory.
pub struct TestAgent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub rootfs: PathBuf,
    pub client: AgentClient,
    pub health: HealthClient,
}

impl TestAgent {
    pub async fn start() -> Result<TestAgent> {
        let dir = tempfile::Builder::new().prefix("hull-agent-test-").tempdir()?;
        let socket = dir.path().join("agent.sock");
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(&rootfs)?;
        let child = Command::new(binary("hull-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--log-level")
            .arg(std::env::var("HULL_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
            .spawn()
            .context("start hull-agent (built by cargo test)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stdio_sock = hull_proto::stdio_socket_path(&socket);
        while !(socket.exists() && stdio_sock.exists()) {
            if Instant::now() > deadline {
                bail!("hull-agent did not create {} within 10 s", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .context("connect to hull-agent")?;
        Ok(TestAgent {
            child: Some(child),
            dir,
            socket,
            rootfs,
            client: AgentClient::new(c.clone()),
            health: HealthClient::new(c),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// A spec whose root is this agent's busybox rootfs.
    pub fn spec(&self, args: &[&str]) -> Value {
        let mut s = oci_spec(args);
        s["root"]["path"] = json!(self.rootfs);
        s
    }

    pub async fn create(&self, id: &str, spec: &Value, io: StdioRequest) -> Result<i32, ttrpc::Error> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = spec.to_string();
        req.stdio = Some(io).into();
        self.client.create_container(ctx(), &req).await.map(|r| r.pid)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), ttrpc::Error> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req).await.map(drop)
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process: &Value, io: StdioRequest) -> Result<i32, ttrpc::Error> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process_json = process.to_string();
        req.stdio = Some(io).into();
        self.client.exec_process(ctx(), &req).await.map(|r| r.pid)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<agent::WaitProcessResponse, ttrpc::Error> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client.wait_process(ctx(), &req).await
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<(), ttrpc::Error> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = signal as u32;
        req.all = all;
        self.client.signal_process(ctx(), &req).await.map(drop)
    }

    pub async fn remove(&self, id: &str) -> Result<(), ttrpc::Error> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout_secs = 2;
        self.client.remove_container(ctx(), &req).await.map(drop)
    }

    /// Opens one stdio stream of a process; the returned socket carries its bytes.
    pub async fn attach(&self, id: &str, exec_id: &str, kind: StreamKind) -> Result<UnixStream> {
        let mut s = UnixStream::connect(hull_proto::stdio_socket_path(&self.socket)).await?;
        let header = StreamHeader { kind, container_id: id.into(), exec_id: exec_id.into() };
        s.write_all(header.to_line().as_bytes()).await?;
        let mut reply = Vec::new();
        loop {
            let b = s.read_u8().await.context("agent closed the stdio connection")?;
            reply.push(b);
            if b == b'\n' {
                break;
            }
        }
        let reply = String::from_utf8_lossy(&reply).to_string();
        if reply != "OK\n" {
            bail!("stdio attach refused: {reply}");
        }
        Ok(s)
    }

    /// Creates a container with stdout and stderr, starts it and collects everything.
    pub async fn run(&self, id: &str, spec: &Value) -> Result<RunOutput> {
        self.create(id, spec, stdio(false, true, true)).await.map_err(|e| anyhow::anyhow!("create {id}: {e:?}"))?;
        let out = self.attach(id, "", StreamKind::Stdout).await?;
        let err = self.attach(id, "", StreamKind::Stderr).await?;
        self.start_container(id).await.map_err(|e| anyhow::anyhow!("start {id}: {e:?}"))?;
        let (stdout, stderr) = tokio::join!(read_to_string(out), read_to_string(err));
        let w = self.wait(id, "").await.map_err(|e| anyhow::anyhow!("wait {id}: {e:?}"))?;
        Ok(RunOutput { status: w.exit_status, oom_killed: w.oom_killed, stdout: stdout?, stderr: stderr? })
    }

    /// Open descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Processes whose parent is the agent.
    pub fn children(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Mount points under this agent's directory, as the host sees them.
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.dir.path().to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&dir))
            .collect()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM makes the agent remove its containers first.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command (which may hold spaces) start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

pub async fn read_to_string(mut s: UnixStream) -> Result<String> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads a line from a stream (for interactive tests).
pub async fn read_line(r: &mut BufReader<UnixStream>) -> Result<String> {
    let mut line = String::new();
    r.read_line(&mut line).await?;
    Ok(line)
}

/// A unique id per test and run, so that parallel tests never share a cgroup.
pub fn unique_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}
