//! hull-vmm: hull's microVM monitor. Today: hull's devices (vsock, fs) as vhost-user
//! backends for QEMU.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hull-vmm", version, about = "hull's KVM microVM monitor and device backends")]
struct Cli {
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve a device to QEMU over vhost-user.
    #[command(subcommand)]
    VhostUser(VhostUserCmd),
}

#[derive(Debug, Subcommand)]
enum VhostUserCmd {
    /// virtio-vsock with a hybrid host side: host clients connect to UDS and write
    /// `CONNECT <port>`; guest connections to port P go to UDS_P.
    Vsock {
        /// The vhost-user socket QEMU connects to.
        #[arg(long)]
        socket: PathBuf,
        /// The host side's unix socket.
        #[arg(long)]
        uds: PathBuf,
        /// The guest's CID.
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
    },
    /// virtio-fs sharing one host directory (FUSE passthrough); QEMU's
    /// `vhost-user-fs-pci,tag=...` names the tag the guest mounts.
    Fs {
        /// The vhost-user socket QEMU connects to.
        #[arg(long)]
        socket: PathBuf,
        /// The host directory the guest sees.
        #[arg(long)]
        shared_dir: PathBuf,
        /// The tag (for the log; QEMU tells the guest).
        #[arg(long, default_value = "hull")]
        tag: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.cmd {
        Cmd::VhostUser(VhostUserCmd::Vsock { socket, uds, guest_cid }) => {
            hull_vmm::vhost_user::vsock::serve(&socket, &uds, guest_cid)
        }
        Cmd::VhostUser(VhostUserCmd::Fs { socket, shared_dir, tag }) => {
            hull_vmm::vhost_user::fs::serve(&socket, &shared_dir, &tag)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("hull-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
