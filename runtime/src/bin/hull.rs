//! `hull`: hull's command-line tool.
//!
//! `hull run` runs one container in a fresh microVM and prints its output: the rootfs goes in
//! through hull's virtio-fs, the VM runs under QEMU (KVM where it can run the guest, TCG
//! otherwise) with hull's vsock device, and the guest's hull-agent runs the container.
//! `--host` runs it through a hull-agent on this host instead (no VM), for debugging.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hull_proto::stdio::StreamKind;
use hull_proto::agent::Storage;
use hull_runtime::agent_client::{ctx, stdio, AgentConn};
use hull_runtime::image::ImageConfig;
use hull_runtime::vm::detect_accel;
use hull_runtime::vm::qemu::{QemuConfig, QemuVm};
use tokio::io::AsyncReadExt;

#[derive(Debug, Parser)]
#[command(name = "hull", version, about = "hull: every pod in its own microVM")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command in a new container and print its output; exits with its status.
    Run {
        /// The container's root filesystem.
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        rootfs: Option<PathBuf>,
        /// An OCI image tarball (an OCI image layout, or `docker save` output) to unpack and
        /// run; its Entrypoint, Cmd, Env and WorkingDir apply.
        #[arg(long)]
        image: Option<PathBuf>,
        /// The container's hostname.
        #[arg(long, default_value = "hull")]
        hostname: String,
        /// Run through a hull-agent on this host instead of a microVM.
        #[arg(long)]
        host: bool,
        /// The guest image directory (bzImage, initramfs.cpio); default: target/guest beside
        /// this binary's directory, or HULL_GUEST_DIR.
        #[arg(long)]
        guest: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// What runs the VM: auto (builtin where KVM has hardware virtualization, else QEMU),
        /// builtin (hull-vmm) or qemu.
        #[arg(long, default_value = "auto", value_parser = parse_hypervisor)]
        hypervisor: hull_runtime::config::Hypervisor,
        /// Seconds to wait for the guest agent.
        #[arg(long, default_value_t = 120)]
        boot_timeout: u64,
        /// Say how the VM was booted and how long it took.
        #[arg(short, long)]
        verbose: bool,
        /// The command and its arguments (with --image: the arguments to its entrypoint, the
        /// image's Cmd when none are given).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List the pods containerd-shim-hull-v2 runs on this host, one line each.
    Ps,
    /// Run a command in a container of a running pod (a debug shell: `hull exec POD -- sh`);
    /// stdin, stdout and stderr are this terminal's (no tty); exits with its status.
    Exec {
        /// The pod's id, or a unique prefix of it (as `hull ps` shows).
        pod: String,
        /// The container to run in (default: the pod's first container that runs a process).
        #[arg(long)]
        container: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Say whether this host can run hull's pods, with which hypervisor, and why not.
    Check {
        /// The hull config to check (default: /etc/hull/config.toml or HULL_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// One line per requirement; exit 0 when pods can run here with some hypervisor.
fn check(config: Option<&Path>) -> Result<i32, CliError> {
    let mut usable = true;
    let mut line = |ok: bool, what: &str, detail: String, required: bool| {
        let _ = writeln!(std::io::stdout(), "{:4} {what}: {detail}", if ok { "ok" } else if required { "FAIL" } else { "no" });
        if required && !ok {
            usable = false;
        }
    };
    line(nix::unistd::geteuid().is_root(), "root", "the shim mounts rootfs and shares".into(), true);
    let cfg = hull_runtime::config::Config::load(config);
    let cfg = match cfg {
        Ok(c) => {
            line(true, "config", format!("{:?} hypervisor", c.hypervisor), true);
            c
        }
        Err(e) => {
            line(false, "config", e.to_string(), true);
            hull_runtime::config::Config::default()
        }
    };
    for (what, p) in [("guest kernel", &cfg.kernel), ("guest initramfs", &cfg.initramfs), ("hull-vmm", &cfg.vmm)] {
        line(p.exists(), what, p.display().to_string(), true);
    }
    let qemu = Command::new(&cfg.qemu).arg("--version").output();
    let qemu_ok = qemu.as_ref().is_ok_and(|o| o.status.success());
    let version = qemu.map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()).unwrap_or_else(|e| e.to_string());
    line(qemu_ok, "QEMU", format!("{}: {version}", cfg.qemu.display()), true);
    let (accel, why) = detect_accel();
    let kvm = accel == hull_runtime::vm::Accel::Kvm;
    line(kvm, "QEMU with KVM", why.clone(), false);
    line(true, "QEMU with TCG", "always available (slow: no hardware virtualization)".into(), false);
    let pvm = hull_vmm::builder::host_kvm_is_pvm();
    let kvm_dev = Path::new("/dev/kvm").exists();
    line(kvm_dev, "builtin hull-vmm", if pvm {
        "kvm_pvm host: runs with hull's compatibility kernel and command line, but every guest kernel instruction is emulated (minutes per boot); auto uses QEMU here".into()
    } else if kvm {
        "KVM with hardware virtualization: auto uses it".into()
    } else {
        "needs /dev/kvm".into()
    }, false);
    let containerd = Path::new("/usr/bin/containerd").exists();
    line(containerd, "containerd", "runtime_type = \"io.containerd.hull.v2\" needs containerd-shim-hull-v2 on its PATH".into(), false);
    let _ = writeln!(std::io::stdout(), "pods here run under: {}", if !usable { "nothing (fix the FAIL lines)" } else if kvm { "QEMU with KVM" } else { "QEMU with TCG" });
    Ok(if usable { 0 } else { 1 })
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("The rootfs {0:?} is not a directory.")]
    NoRootfs(PathBuf),
    #[error("hull run needs root (it creates namespaces and cgroups).")]
    NotRoot,
    #[error("Cannot start {path:?}: {source}.")]
    Agent { path: PathBuf, source: std::io::Error },
    #[error("The agent did not come up within 10 s.")]
    AgentTimeout,
    #[error(transparent)]
    Client(#[from] hull_runtime::agent_client::ClientError),
    #[error("Cannot copy the container's output: {0}.")]
    Output(#[source] std::io::Error),
    #[error("Cannot start the async runtime: {0}.")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] hull_runtime::vm::qemu::QemuError),
    #[error("The VM did not power off after DestroySandbox.")]
    NoPowerOff,
    #[error(transparent)]
    Image(#[from] hull_runtime::image::ImageError),
    #[error("Cannot run this VM: {0}.")]
    Engine(String),
    #[error("No command to run: give one after --, or use an image with an Entrypoint or Cmd.")]
    NoCommand,
    #[error("No running hull pod has an id starting with {0:?} (see `hull ps`).")]
    NoPod(String),
    #[error("{prefix:?} names more than one pod: {pods}.")]
    AmbiguousPod { prefix: String, pods: String },
    #[error("No container of pod {0} runs a process to exec in (name one with --container).")]
    NoContainer(String),
}

/// A pod of the shim, from its state directory (`/run/hull/shim/<namespace>/<pod>`).
struct PodState {
    namespace: String,
    id: String,
    dir: PathBuf,
    vmm_pid: Option<u32>,
    containers: Vec<String>,
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn pods() -> Vec<PodState> {
    let root = Path::new(hull_runtime::shim::STATE_ROOT);
    let mut out = Vec::new();
    for namespace in dir_names(root) {
        for id in dir_names(&root.join(&namespace)) {
            let dir = root.join(&namespace).join(&id);
            // The first pid recorded is QEMU's; a pod whose VMM is gone is not running.
            let vmm_pid = std::fs::read_to_string(dir.join("pids"))
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
                .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let containers = dir_names(&dir.join("shared"));
            out.push(PodState { namespace: namespace.clone(), id, dir, vmm_pid, containers });
        }
    }
    out
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

fn ps() -> Result<i32, CliError> {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{:<14} {:<13} {:>8} {:>9}  CONTAINERS", "NAMESPACE", "POD", "VMM PID", "UPTIME");
    for p in pods() {
        let uptime = std::fs::metadata(p.dir.join("pids")).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        let uptime = uptime.map(|d| format!("{}s", d.as_secs())).unwrap_or_else(|| "-".into());
        let pid = p.vmm_pid.map(|p| p.to_string()).unwrap_or_else(|| "exited".into());
        let containers: Vec<&str> = p.containers.iter().map(|c| short(c)).collect();
        let _ = writeln!(out, "{:<14} {:<13} {:>8} {:>9}  {}", p.namespace, short(&p.id), pid, uptime, containers.join(","));
    }
    Ok(0)
}

async fn exec_in_pod(prefix: &str, container: Option<&str>, command: &[String]) -> Result<i32, CliError> {
    let matching: Vec<PodState> = pods().into_iter().filter(|p| p.id.starts_with(prefix) && p.vmm_pid.is_some()).collect();
    let pod = match matching.len() {
        0 => return Err(CliError::NoPod(prefix.into())),
        1 => &matching[0],
        _ => {
            let pods = matching.iter().map(|p| format!("{}/{}", p.namespace, short(&p.id))).collect::<Vec<_>>().join(", ");
            return Err(CliError::AmbiguousPod { prefix: prefix.into(), pods });
        }
    };
    let conn = AgentConn::connect_hybrid_vsock(&pod.dir.join("vm/vsock.sock")).await?;
    let process = serde_json::json!({
        "args": command, "cwd": "/", "terminal": false, "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=dumb"],
    });
    let exec_id = format!("hull-exec-{}", std::process::id());
    let candidates: Vec<String> = match container {
        Some(c) => vec![c.to_string()],
        None => pod.containers.clone(),
    };
    let mut target = None;
    for id in &candidates {
        match conn.exec(id, &exec_id, &process, stdio(true, true, true)).await {
            Ok(_) => {
                target = Some(id.clone());
                break;
            }
            // CRI's pause container runs nothing in the guest: the agent does not know it.
            Err(e) if container.is_none() && e.code() == Some(ttrpc::Code::NOT_FOUND) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let id = target.ok_or_else(|| CliError::NoContainer(short(&pod.id).into()))?;
    let mut stdin = conn.attach(&id, &exec_id, StreamKind::Stdin).await?;
    let out = conn.attach(&id, &exec_id, StreamKind::Stdout).await?;
    let err = conn.attach(&id, &exec_id, StreamKind::Stderr).await?;
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut stdin).await;
        // Our stdin's end is the process's stdin EOF.
        let _ = stdin.shutdown().await;
    });
    let (o, e) = tokio::join!(copy_to(out, std::io::stdout()), copy_to(err, std::io::stderr()));
    o.and(e).map_err(CliError::Output)?;
    Ok(conn.wait(&id, &exec_id).await?.exit_status)
}

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

async fn copy_to(mut from: tokio::net::UnixStream, mut to: impl Write) -> std::io::Result<()> {
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

fn parse_hypervisor(s: &str) -> Result<hull_runtime::config::Hypervisor, String> {
    use hull_runtime::config::Hypervisor;
    match s {
        "auto" => Ok(Hypervisor::Auto),
        "builtin" => Ok(Hypervisor::Builtin),
        "qemu" => Ok(Hypervisor::Qemu),
        other => Err(format!("{other:?} is not auto, builtin or qemu")),
    }
}

/// How `hull run` boots its VM.
struct VmChoice {
    guest: Option<PathBuf>,
    memory: u32,
    hypervisor: hull_runtime::config::Hypervisor,
    boot_timeout: u64,
    verbose: bool,
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

async fn run_on_host(rootfs: &Path, hostname: &str, command: &[String], image: &ImageConfig) -> Result<i32, CliError> {
    let rootfs = checked_rootfs(rootfs)?;
    let agent = HostAgent::start()?;
    let conn = agent.connect().await?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut spec = hull_runtime::oci::default_spec(&args, &rootfs.to_string_lossy());
    apply_image(&mut spec, image);
    spec["hostname"] = hostname.into();
    run_container(&conn, &format!("run-{}", std::process::id()), &spec, Vec::new()).await
}

fn beside_exe(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).unwrap_or_else(|| name.into())
}

async fn run_in_vm(rootfs: &Path, hostname: &str, command: &[String], image: &ImageConfig, choice: VmChoice) -> Result<i32, CliError> {
    let VmChoice { guest, memory, hypervisor, boot_timeout, verbose } = choice;
    let rootfs = checked_rootfs(rootfs)?;
    let guest = guest
        .or_else(|| std::env::var_os("HULL_GUEST_DIR").map(PathBuf::from))
        .unwrap_or_else(|| beside_exe("../guest"));
    let work = tempfile::Builder::new()
        .prefix("hull-run-")
        .tempdir()
        .map_err(|source| CliError::Agent { path: "tempdir".into(), source })?;
    let (engine, why) = hull_runtime::vm::choose_engine(hypervisor).map_err(CliError::Engine)?;
    let t = Instant::now();
    let mut vm = QemuVm::start(QemuConfig {
        qemu: std::env::var_os("HULL_QEMU").map(PathBuf::from).unwrap_or_else(|| "qemu-system-x86_64".into()),
        vmm: beside_exe("hull-vmm"),
        kernel: guest.join("bzImage"),
        initramfs: guest.join("initramfs.cpio"),
        vcpus: 1,
        memory_mib: memory,
        engine,
        guest_cid: 3,
        workdir: work.path().into(),
        cmdline_extra: vec![],
        qemu_extra: vec![],
        // The rootfs directory itself, through hull's virtio-fs: nothing is copied.
        shared_dir: Some(rootfs.clone()),
        nic: None,
    })?;
    let conn = vm.wait_for_agent(Duration::from_secs(boot_timeout)).await?;
    if verbose {
        eprintln!("hull: microVM ready in {:.2} s under {engine:?} ({why})", t.elapsed().as_secs_f64());
    }
    let mut sandbox = hull_proto::agent::CreateSandboxRequest::new();
    sandbox.sandbox_id = format!("run-{}", std::process::id());
    sandbox.hostname = hostname.into();
    conn.client
        .create_sandbox(ctx(), &sandbox)
        .await
        .map_err(|e| hull_runtime::agent_client::ClientError::rpc("CreateSandbox", e))?;
    let root = "/run/hull/rootfs";
    let share = hull_runtime::vm::qemu::share_storage(root);
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut spec = hull_runtime::oci::default_spec(&args, root);
    apply_image(&mut spec, image);
    let status = run_container(&conn, "run", &spec, vec![share]).await;
    let mut destroy = hull_proto::agent::DestroySandboxRequest::new();
    destroy.timeout_secs = 1;
    let _ = conn.client.destroy_sandbox(ctx(), &destroy).await;
    if vm.wait_exit(Duration::from_secs(30)).await.is_none() {
        return Err(CliError::NoPowerOff);
    }
    status
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| match &cli.cmd {
            Cmd::Run { rootfs, image, hostname, host, guest, memory, hypervisor, boot_timeout, verbose, command } => {
                // The unpacked image lives as long as the run.
                let unpacked = tempfile::Builder::new().prefix("hull-image-").tempdir().map_err(|source| CliError::Agent { path: "tempdir".into(), source });
                let prepared = unpacked.and_then(|dir| {
                    let (rootfs, config, command) = match (rootfs, image) {
                        (_, Some(tar)) => {
                            let (rootfs, config) = hull_runtime::image::unpack(tar, dir.path())?;
                            let command = config.command(command);
                            (rootfs, config, command)
                        }
                        (Some(r), None) => (r.clone(), ImageConfig::default(), command.clone()),
                        (None, None) => unreachable!("clap requires --rootfs or --image"),
                    };
                    if command.is_empty() {
                        return Err(CliError::NoCommand);
                    }
                    Ok((dir, rootfs, config, command))
                });
                prepared.and_then(|(_dir, rootfs, config, command)| {
                    if *host {
                        rt.block_on(run_on_host(&rootfs, hostname, &command, &config))
                    } else {
                        let choice = VmChoice { guest: guest.clone(), memory: *memory, hypervisor: *hypervisor, boot_timeout: *boot_timeout, verbose: *verbose };
                        rt.block_on(run_in_vm(&rootfs, hostname, &command, &config, choice))
                    }
                })
            }
            Cmd::Check { config } => check(config.as_deref()),
            Cmd::Ps => ps(),
            Cmd::Exec { pod, container, command } => rt.block_on(exec_in_pod(pod, container.as_deref(), command)),
        });
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(e) => {
            eprintln!("hull: {e}");
            ExitCode::from(125)
        }
    }
}
