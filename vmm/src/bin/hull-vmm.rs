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
        /// A virtio block device: PATH[,ro][,id=ID] (repeatable; vda, vdb, ... in order).
        #[arg(long = "disk", value_parser = parse_disk)]
        disks: Vec<hull_vmm::builder::DiskConfig>,
        /// A virtio-net device on a tap: tap=NAME,mac=MAC or fd=N,mac=MAC (an inherited tap fd
        /// opened with IFF_VNET_HDR).
        #[arg(long = "net", value_parser = parse_nic)]
        nics: Vec<hull_vmm::builder::NicConfig>,
        /// A hybrid vsock device whose host side is this unix socket.
        #[arg(long)]
        vsock_uds: Option<PathBuf>,
        /// The guest's vsock CID.
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
        /// A virtio-fs share: TAG=DIR (repeatable; the guest mounts `-t virtiofs TAG`).
        #[arg(long = "share", value_parser = parse_share)]
        shares: Vec<hull_vmm::builder::ShareConfig>,
        /// A virtio-rng device.
        #[arg(long)]
        rng: bool,
        /// Run without seccomp filters (for debugging only).
        #[arg(long)]
        no_seccomp: bool,
        /// Serve the control API (state, pause, resume, stop) on this unix socket.
        #[arg(long)]
        api_socket: Option<PathBuf>,
    },
    /// Send a request to a running VM's control socket: state, pause, resume or stop.
    Ctl {
        #[arg(long)]
        api_socket: PathBuf,
        request: String,
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

fn parse_disk(s: &str) -> Result<hull_vmm::builder::DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("a disk needs a path")?;
    let mut disk = hull_vmm::builder::DiskConfig { path: path.into(), read_only: false, id: String::new() };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            Some(("id", id)) => disk.id = id.into(),
            _ => return Err(format!("unknown disk option {opt:?} (ro, id=ID)")),
        }
    }
    Ok(disk)
}

fn parse_nic(s: &str) -> Result<hull_vmm::builder::NicConfig, String> {
    use hull_vmm::builder::TapSource;
    let (mut tap, mut mac) = (None, None);
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("tap", name)) => tap = Some(TapSource::Name(name.into())),
            Some(("fd", n)) => tap = Some(TapSource::Fd(n.parse().map_err(|_| format!("{n:?} is not an fd number"))?)),
            Some(("mac", m)) => mac = Some(hull_vmm::devices::virtio::net::parse_mac(m).map_err(|e| e.to_string())?),
            _ => return Err(format!("unknown net option {opt:?} (tap=NAME or fd=N, mac=MAC)")),
        }
    }
    let tap = tap.ok_or("a net device needs tap=NAME or fd=N")?;
    // A locally administered address when none is given.
    let mac = mac.unwrap_or([0x02, 0x68, 0x75, 0x6c, 0x6c, 0x00]);
    Ok(hull_vmm::builder::NicConfig { tap, mac })
}

fn parse_share(s: &str) -> Result<hull_vmm::builder::ShareConfig, String> {
    let (tag, dir) = s.split_once('=').ok_or("a share is TAG=DIR")?;
    Ok(hull_vmm::builder::ShareConfig { tag: tag.into(), dir: dir.into() })
}

struct BootArgs {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    vcpus: u8,
    memory_mib: u64,
    console: PathBuf,
    devices: hull_vmm::builder::Devices,
    seccomp: bool,
    api_socket: Option<PathBuf>,
}

fn boot(BootArgs { kernel, initramfs, cmdline, vcpus, memory_mib, console, devices, seccomp, api_socket }: BootArgs) -> Result<(), String> {
    let console: Box<dyn std::io::Write + Send> = if console.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::fs::File::create(&console).map_err(|e| format!("Cannot create the console file {console:?}: {e}."))?)
    };
    let config = hull_vmm::builder::VmConfig { kernel, initramfs, cmdline, vcpus, memory_mib, console, devices, seccomp };
    let listener = api_socket.as_deref().map(hull_vmm::api::bind).transpose().map_err(|e| e.to_string())?;
    let vm = hull_vmm::builder::start(config).map_err(|e| e.to_string())?;
    if let Some(listener) = listener {
        let controller = vm.controller();
        let filter = if seccomp { Some(hull_vmm::seccomp::api_thread().map_err(|e| e.to_string())?) } else { None };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Some(Err(e)) = filter.map(|f| f.apply()) {
                    tracing::error!(error = %e, "the API thread cannot install its seccomp filter; no API");
                    return;
                }
                hull_vmm::api::serve(listener, controller)
            })
            .map_err(|e| format!("Cannot start the API thread: {e}."))?;
    }
    if seccomp {
        // Everything this thread still does is waiting for the VM's end and tearing it down.
        hull_vmm::seccomp::main_thread().and_then(|f| f.apply()).map_err(|e| e.to_string())?;
    }
    let exit = vm.wait().map_err(|e| e.to_string())?;
    tracing::info!(?exit, "the guest ended the VM");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; log files stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let result = match cli.cmd {
        Cmd::Boot { kernel, initramfs, cmdline, vcpus, memory_mib, console, disks, nics, vsock_uds, guest_cid, shares, rng, no_seccomp, api_socket } => {
            let vsock = vsock_uds.map(|uds| hull_vmm::builder::VsockConfig { guest_cid, uds });
            let devices = hull_vmm::builder::Devices { disks, nics, vsock, shares, rng };
            boot(BootArgs { kernel, initramfs, cmdline, vcpus, memory_mib, console, devices, seccomp: !no_seccomp, api_socket })
        }
        Cmd::Ctl { api_socket, request } => hull_vmm::api::request(&api_socket, &request).map(|reply| println!("{reply}")).map_err(|e| e.to_string()),
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
