//! Helpers shared by hull's integration suites: a real `hull-agent` on a unix socket, a busybox
//! root filesystem built from Debian's busybox-static, OCI specs, and stdio streams.

pub mod containerd;
pub mod cri;
pub mod kvm_host;
pub mod probe;
pub mod proc_memory;
pub mod scenario;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
pub use hull_runtime::agent::{ctx, read_all, stdio, AgentConn, ClientError, RunOutput};
pub use hull_runtime::oci::{default_process as oci_process, default_spec};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

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
        $crate::skip_if_missing!($crate::missing_prerequisite())
    };
}

/// `require_prerequisites!` for a suite's own list: `missing` is an `Option<String>` saying
/// what is missing here.
#[macro_export]
macro_rules! skip_if_missing {
    ($missing:expr) => {
        if let Some(why) = $missing {
            if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
                panic!("prerequisite missing under HULL_REQUIRE_ALL: {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

pub const BUSYBOX: &str = "/bin/busybox";

/// The hull binaries built beside the test executable (target/<triple>/<profile>/).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<triple>/<profile>/deps/<test> -> target/<triple>/<profile>/<name>
    exe.parent().and_then(Path::parent).map(|d| d.join(name)).expect("target dir")
}

/// The guest image the suites boot: the workspace's target/guest, where `hull-guest-image
/// build` puts it (and where the binaries' default config looks, two levels up from them).
pub fn guest_image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("target/guest")
}

/// Why the guest image is not there to boot, or None.
pub fn missing_guest_image() -> Option<String> {
    let manifest = guest_image_dir().join("manifest.json");
    (!manifest.exists()).then(|| format!("needs the guest image {} (cargo run -p hull-guest-image -- build)", manifest.display()))
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

/// A hull-agent serving on a unix socket in its own temporary directory.
pub struct TestAgent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub rootfs: PathBuf,
    pub conn: AgentConn,
}

impl std::ops::Deref for TestAgent {
    type Target = AgentConn;
    fn deref(&self) -> &AgentConn {
        &self.conn
    }
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
        let conn = AgentConn::connect_unix(&socket).await?;
        Ok(TestAgent { child: Some(child), dir, socket, rootfs, conn })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// A spec whose root is this agent's busybox rootfs.
    pub fn spec(&self, args: &[&str]) -> Value {
        default_spec(args, &self.rootfs.to_string_lossy())
    }

    /// Waits for the agent process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Open descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// What the agent's descriptors point at, for failure messages.
    pub fn fd_targets(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).map(|p| p.display().to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
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

/// Polls `probe` every 10 ms until it gives a value or `limit` passes: a test waits for the
/// condition itself, not for a guess of how long it takes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
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

/// The status code and message of a refused call.
pub fn rpc_error(e: &ClientError) -> (ttrpc::Code, String) {
    match e {
        ClientError::Rpc { code, message, .. } => (*code, message.clone()),
        other => (ttrpc::Code::UNKNOWN, other.to_string()),
    }
}

/// A unique id per test and run, so that parallel tests never share a cgroup.
pub fn unique_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// Deterministic pseudo-random bytes (xorshift64), for transfers checked by checksum.
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// SHA-256 of `bytes` in lower-case hex, as hull records a file's content.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// `s` without its ANSI escape sequences (the shim's and the agent's logs are coloured).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
