//! `hull`: hull's command-line tool.
//!
//! One file per command: `run`, `ps`, `exec`, `check`.

mod check;
mod exec;
mod ps;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hull_runtime::image::ImageConfig;

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
        /// The guest image directory (vmlinux, initramfs.cpio); default: target/guest beside
        /// this binary's directory, or HULL_GUEST_DIR.
        #[arg(long)]
        guest: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// What runs the VM: auto (builtin where KVM has hardware virtualization, else QEMU),
        /// builtin (hull-vmm) or qemu.
        #[arg(long, default_value = "auto", value_parser = run::parse_hypervisor)]
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

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("The rootfs {0:?} is not a directory.")]
    NoRootfs(PathBuf),
    #[error("hull run needs root (it creates namespaces and cgroups).")]
    NotRoot,
    #[error("Cannot start {path:?}: {source}.")]
    Agent { path: PathBuf, source: std::io::Error },
    #[error("The agent did not come up within 10 s.")]
    AgentTimeout,
    #[error(transparent)]
    Client(#[from] hull_runtime::agent::ClientError),
    #[error("Cannot copy the container's output: {0}.")]
    Output(#[source] std::io::Error),
    #[error("Cannot start the async runtime: {0}.")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Pod(#[from] hull_runtime::pod::PodError),
    #[error(transparent)]
    Config(#[from] hull_runtime::config::ConfigError),
    #[error("The VM neither answered DestroySandbox nor powered off.")]
    NoPowerOff,
    #[error(transparent)]
    Image(#[from] hull_runtime::image::ImageError),
    #[error("No command to run: give one after --, or use an image with an Entrypoint or Cmd.")]
    NoCommand,
    #[error("No running hull pod has an id starting with {0:?} (see `hull ps`).")]
    NoPod(String),
    #[error("{prefix:?} names more than one pod: {pods}.")]
    AmbiguousPod { prefix: String, pods: String },
    #[error("No container of pod {0} runs a process to exec in (name one with --container).")]
    NoContainer(String),
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
                        rt.block_on(run::run_on_host(&rootfs, hostname, &command, &config))
                    } else {
                        let choice = run::VmChoice { guest: guest.clone(), memory: *memory, hypervisor: *hypervisor, boot_timeout: *boot_timeout, verbose: *verbose };
                        rt.block_on(run::run_in_vm(&rootfs, hostname, &command, &config, choice))
                    }
                })
            }
            Cmd::Check { config } => check::check(config.as_deref()),
            Cmd::Ps => ps::ps(),
            Cmd::Exec { pod, container, command } => rt.block_on(exec::exec_in_pod(pod, container.as_deref(), command)),
        });
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(e) => {
            eprintln!("hull: {e}");
            ExitCode::from(125)
        }
    }
}
