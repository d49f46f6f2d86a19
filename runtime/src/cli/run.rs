//! `hull run`: one container in a fresh microVM (or, with `--host`, through a hull-agent on
//! this host), its output printed, its exit status returned. The VM is a pod booted and
//! destroyed exactly as the shim does it; its share is the rootfs directory itself (nothing is
//! copied, and nothing is mounted over the user's directory).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hull_proto::agent::Storage;
use hull_proto::stdio::StreamKind;
use hull_runtime::agent::{stdio, AgentConn};
use hull_runtime::config::Config;
use hull_runtime::image::ImageConfig;
use hull_runtime::oci::default_spec;
use hull_runtime::pod::share::share_storage;
use hull_runtime::pod::state::PodDir;
use hull_runtime::pod::{Pod, PodSpec};
use tokio::io::AsyncReadExt;

use crate::CliError;

/// A hull-agent on this host, stopped (with its containers) when dropped.
struct HostAgent {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl HostAgent {
    fn start() -> Result<HostAgent, CliError> {
        let dir = tempfile::Builder::new().prefix("hull-run-").tempdir().map_err(|source| CliError::Agent { path: "tempdir".into(), source })?;
        let socket = dir.path().join("agent.sock");
        let exe = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("hull-agent")));
        let path = exe.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("hull-agent"));
        let child = Command::new(&path)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--log-level")
            .arg("warn")
            .spawn()
            .map_err(|source| CliError::Agent { path, source })?;
        Ok(HostAgent { child, _dir: dir, socket })
    }

    async fn connect(&self) -> Result<AgentConn, CliError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stdio_sock = hull_proto::stdio_socket_path(&self.socket);
        while !(self.socket.exists() && stdio_sock.exists()) {
            if Instant::now() > deadline {
                return Err(CliError::AgentTimeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(AgentConn::connect_unix(&self.socket).await?)
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

pub async fn copy_to(mut from: tokio::net::UnixStream, mut to: impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.flush();
        }
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// Creates, attaches, starts and waits for a container; returns its exit status.
async fn run_container(conn: &AgentConn, id: &str, spec: &serde_json::Value, storages: Vec<Storage>) -> Result<i32, CliError> {
    conn.create_on(id, spec, stdio(false, true, true), storages).await?;
    let out = conn.attach(id, "", StreamKind::Stdout).await?;
    let err = conn.attach(id, "", StreamKind::Stderr).await?;
    conn.start(id).await?;
    let (o, e) = tokio::join!(copy_to(out, std::io::stdout()), copy_to(err, std::io::stderr()));
    o.and(e).map_err(CliError::Output)?;
    let status = conn.wait(id, "").await?.exit_status;
    conn.remove(id).await?;
    Ok(status)
}

/// The image's environment (PATH kept when the image sets none) and working directory.
fn apply_image(spec: &mut serde_json::Value, image: &ImageConfig) {
    if !image.env.is_empty() {
        let mut env = image.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            if let Some(path) = spec.pointer("/process/env").and_then(|e| e.as_array()).and_then(|a| a.iter().filter_map(|v| v.as_str()).find(|v| v.starts_with("PATH="))) {
                env.push(path.to_string());
            }
        }
        spec["process"]["env"] = env.into();
    }
    if !image.working_dir.is_empty() {
        spec["process"]["cwd"] = image.working_dir.clone().into();
    }
}

pub fn parse_hypervisor(s: &str) -> Result<hull_runtime::config::Hypervisor, String> {
    use hull_runtime::config::Hypervisor;
    match s {
        "auto" => Ok(Hypervisor::Auto),
        "builtin" => Ok(Hypervisor::Builtin),
        "qemu" => Ok(Hypervisor::Qemu),
        other => Err(format!("{other:?} is not auto, builtin or qemu")),
    }
}

/// How `hull run` boots its VM.
pub struct VmChoice {
    pub guest: Option<PathBuf>,
    pub memory: u32,
    pub hypervisor: hull_runtime::config::Hypervisor,
    pub boot_timeout: u64,
    pub verbose: bool,
}

fn checked_rootfs(rootfs: &Path) -> Result<PathBuf, CliError> {
    if !rootfs.is_dir() {
        return Err(CliError::NoRootfs(rootfs.into()));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(CliError::NotRoot);
    }
    std::fs::canonicalize(rootfs).map_err(|_| CliError::NoRootfs(rootfs.into()))
}

pub async fn run_on_host(rootfs: &Path, hostname: &str, command: &[String], image: &ImageConfig) -> Result<i32, CliError> {
    let rootfs = checked_rootfs(rootfs)?;
    let agent = HostAgent::start()?;
    let conn = agent.connect().await?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut spec = default_spec(&args, &rootfs.to_string_lossy());
    apply_image(&mut spec, image);
    spec["hostname"] = hostname.into();
    run_container(&conn, &format!("run-{}", std::process::id()), &spec, Vec::new()).await
}

fn beside_exe(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).unwrap_or_else(|| name.into())
}

/// Boots a pod for the run, runs the container in it and destroys the pod.
pub async fn run_in_vm(rootfs: &Path, hostname: &str, command: &[String], image: &ImageConfig, choice: VmChoice) -> Result<i32, CliError> {
    let VmChoice { guest, memory, hypervisor, boot_timeout, verbose } = choice;
    let rootfs = checked_rootfs(rootfs)?;
    let guest = guest
        .or_else(|| std::env::var_os("HULL_GUEST_DIR").map(PathBuf::from))
        .unwrap_or_else(hull_runtime::config::guest_dir);
    // The VM is confined as the configured shim's are (`/etc/hull/config.toml` or
    // $HULL_CONFIG: the jail, its uids and limits, the log cap); what to boot comes from here.
    let host = Config::load(None)?;
    let config = Config {
        hypervisor,
        kernel: guest.join(hull_runtime::config::GUEST_KERNEL),
        image: guest.join(hull_runtime::config::ROOT_IMAGE),
        initramfs: guest.join("initramfs.cpio"),
        qemu: std::env::var_os("HULL_QEMU").map(PathBuf::from).unwrap_or_else(|| "qemu-system-x86_64".into()),
        vmm: beside_exe("hull-vmm"),
        vcpus: 1,
        memory_mib: memory,
        boot_timeout_secs: boot_timeout,
        vm_log_kib: host.vm_log_kib,
        vm_open_files: host.vm_open_files,
        jail: host.jail,
        jail_uid: host.jail_uid,
        jail_uids: host.jail_uids,
        jail_gid: host.jail_gid,
        jail_max_processes: host.jail_max_processes,
        ..Config::default()
    };
    let work = tempfile::Builder::new()
        .prefix("hull-run-")
        .tempdir()
        .map_err(|source| CliError::Agent { path: "tempdir".into(), source })?;
    let id = format!("run-{}", std::process::id());
    let t = Instant::now();
    let spec = PodSpec { id: &id, hostname, netns: None, share: Some(&rootfs), sysctls: Default::default(), cgroups_path: None };
    let pod = Pod::boot(&config, PodDir::at(work.path().join(&id)), spec).await?;
    if verbose {
        eprintln!("hull: microVM ready in {:.2} s under {:?} ({})", t.elapsed().as_secs_f64(), pod.engine, pod.engine_why);
    }
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    // The guest mounts the share, the rootfs itself, here.
    let root = "/run/hull/rootfs";
    let mut spec = default_spec(&args, root);
    apply_image(&mut spec, image);
    let status = run_container(&pod.conn, "run", &spec, vec![share_storage(root)]).await;
    if !pod.destroy(Duration::from_secs(30)).await {
        return Err(CliError::NoPowerOff);
    }
    status
}
