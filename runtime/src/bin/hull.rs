//! `hull`: hull's command-line tool.
//!
//! `hull run` runs one container and prints its output. Until the microVM path lands it
//! starts a `hull-agent` on this host (the same agent that runs as PID 1 in a pod VM) and runs
//! the container through its API, so what it shows is the agent's real container set-up:
//! namespaces, cgroups, pivot_root, stdio streams.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hull_proto::stdio::StreamKind;
use hull_runtime::agent_client::{stdio, AgentConn};
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
        #[arg(long)]
        rootfs: PathBuf,
        /// The container's hostname.
        #[arg(long, default_value = "hull")]
        hostname: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
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

async fn run(rootfs: &Path, hostname: &str, command: &[String]) -> Result<i32, CliError> {
    if !rootfs.is_dir() {
        return Err(CliError::NoRootfs(rootfs.into()));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(CliError::NotRoot);
    }
    let rootfs = std::fs::canonicalize(rootfs).map_err(|_| CliError::NoRootfs(rootfs.into()))?;
    let agent = HostAgent::start()?;
    let conn = agent.connect().await?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut spec = hull_runtime::oci::default_spec(&args, &rootfs.to_string_lossy());
    spec["hostname"] = hostname.into();
    let id = format!("run-{}", std::process::id());
    conn.create(&id, &spec, stdio(false, true, true)).await?;
    let out = conn.attach(&id, "", StreamKind::Stdout).await?;
    let err = conn.attach(&id, "", StreamKind::Stderr).await?;
    conn.start(&id).await?;
    let (o, e) = tokio::join!(copy_to(out, std::io::stdout()), copy_to(err, std::io::stderr()));
    o.and(e).map_err(CliError::Output)?;
    let status = conn.wait(&id, "").await?.exit_status;
    conn.remove(&id).await?;
    Ok(status)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| match &cli.cmd {
            Cmd::Run { rootfs, hostname, command } => rt.block_on(run(rootfs, hostname, command)),
        });
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(e) => {
            eprintln!("hull: {e}");
            ExitCode::from(125)
        }
    }
}
