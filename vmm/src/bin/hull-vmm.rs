//! hull-vmm: hull's microVM monitor. `boot` runs a KVM microVM (kernel, initramfs, command
//! line, serial console) until the guest reboots; `vhost-user` serves hull's devices (vsock,
//! fs) to QEMU.

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
    /// Boot a KVM microVM and run it until the guest reboots or powers off (exit 0), or the
    /// VM fails (exit 1, naming the exit and the vCPU registers).
    Boot {
        /// The guest kernel: an ELF vmlinux or a bzImage.
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initramfs: Option<PathBuf>,
        /// The kernel command line.
        #[arg(long, default_value = hull_vmm::builder::DEFAULT_CMDLINE)]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// Where the serial console goes: a file, or - for stdout.
        #[arg(long, default_value = "-")]
        console: PathBuf,
    },
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

fn boot(kernel: PathBuf, initramfs: Option<PathBuf>, cmdline: String, vcpus: u8, memory_mib: u64, console: PathBuf) -> Result<(), String> {
    let console: Box<dyn std::io::Write + Send> = if console.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::fs::File::create(&console).map_err(|e| format!("Cannot create the console file {console:?}: {e}."))?)
    };
    let config = hull_vmm::builder::VmConfig { kernel, initramfs, cmdline, vcpus, memory_mib, console };
    let exit = hull_vmm::builder::run(config).map_err(|e| e.to_string())?;
    tracing::info!(?exit, "the guest ended the VM");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.cmd {
        Cmd::Boot { kernel, initramfs, cmdline, vcpus, memory_mib, console } => boot(kernel, initramfs, cmdline, vcpus, memory_mib, console),
        Cmd::VhostUser(VhostUserCmd::Vsock { socket, uds, guest_cid }) => {
            hull_vmm::vhost_user::vsock::serve(&socket, &uds, guest_cid).map_err(|e| e.to_string())
        }
        Cmd::VhostUser(VhostUserCmd::Fs { socket, shared_dir, tag }) => {
            hull_vmm::vhost_user::fs::serve(&socket, &shared_dir, &tag).map_err(|e| e.to_string())
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
