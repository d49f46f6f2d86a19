//! hull-vmm: hull's microVM monitor. `boot` runs a KVM microVM (kernel, initramfs, command
//! line, serial console) until the guest reboots; `vhost-user` serves hull's devices (vsock,
//! fs) to QEMU.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;
use hull_vmm::config::{Devices, DiskConfig, NicConfig, ShareConfig, ShareServer, TapSource, VmConfig, VsockConfig, DEFAULT_CMDLINE};

#[derive(Debug, Parser)]
#[command(name = "hull-vmm", version, about = "hull's KVM microVM monitor and device backends")]
struct Cli {
    /// Log filter: a default level and `target=level` directives (`info,hull_vmm=debug`).
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    /// The most files this process may hold open (RLIMIT_NOFILE, soft and hard; a lower limit
    /// it inherited stays). The guest makes the virtio-fs device hold a host file open for
    /// every inode it has looked up and not forgotten and every file it has open; a guest that
    /// never forgets would otherwise pin host files (and the host memory behind them) without
    /// bound.
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    open_files: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot a KVM microVM and run it until the guest reboots or powers off (exit 0), or the
    /// VM fails (exit 1, naming the exit and the vCPU registers).
    Boot {
        /// The guest kernel: an ELF vmlinux or a bzImage.
        #[arg(long, required_unless_present = "restore")]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initramfs: Option<PathBuf>,
        /// The kernel command line. The default is what hull-vmm's machine needs (console,
        /// no PCI or ACPI, the i8042 as reset line); replace it only for a guest that is not
        /// Linux, and give a Linux guest's own options with --append.
        #[arg(long, default_value = DEFAULT_CMDLINE)]
        cmdline: String,
        /// Words appended to the kernel command line after --cmdline, e.g.
        /// `--append "panic=-1 loglevel=4"` (repeatable; one value may hold several words).
        #[arg(long = "append", value_name = "WORDS", allow_hyphen_values = true)]
        append: Vec<String>,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// Where the serial console goes: a file, or - for stdout.
        #[arg(long, default_value = "-")]
        console: PathBuf,
        /// A virtio block device: PATH[,ro][,id=ID] (repeatable; vda, vdb, ... in order).
        #[arg(long = "disk", value_parser = parse_disk)]
        disks: Vec<DiskConfig>,
        /// A virtio-net device on a tap: tap=NAME,mac=MAC or fd=N,mac=MAC (an inherited tap fd
        /// opened with IFF_VNET_HDR), or none,mac=MAC (no tap: for a VM to save as a snapshot).
        #[arg(long = "net", value_parser = parse_nic)]
        nics: Vec<NicConfig>,
        /// A hybrid vsock device whose host side is this unix socket.
        #[arg(long)]
        vsock_uds: Option<PathBuf>,
        /// The guest's vsock CID.
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
        /// A virtio-fs share: TAG=DIR (repeatable; the guest mounts `-t virtiofs TAG`).
        #[arg(long = "share", value_parser = parse_share)]
        shares: Vec<ShareConfig>,
        /// A virtio-fs share another process serves: TAG=SOCKET, the socket of a vhost-user fs
        /// backend (`hull-vmm vhost-user fs`) that serves it (repeatable; after the --share ones).
        #[arg(long = "vhost-user-fs", value_parser = parse_vhost_user_fs)]
        vhost_user_shares: Vec<ShareConfig>,
        /// A virtio-balloon that takes the guest's free page reports: memory the guest frees
        /// (2 MiB blocks and up) goes back to the host. It never asks the guest for memory.
        #[arg(long)]
        free_page_reporting: bool,
        /// A virtio-rng device.
        #[arg(long)]
        rng: bool,
        /// A virtio-pmem device on this file, mapped read-only (a whole number of 2 MiB pages):
        /// the guest's root image, /dev/pmem0, read in place.
        #[arg(long)]
        pmem: Option<PathBuf>,
        /// Run without seccomp filters (for debugging only).
        #[arg(long)]
        no_seccomp: bool,
        /// UID:GID every thread but the virtio-fs workers' takes before its filter: a hull-vmm
        /// run as root only to serve a share keeps root on those threads alone.
        #[arg(long, value_parser = parse_ids, conflicts_with = "no_seccomp")]
        thread_user: Option<(u32, u32)>,
        /// Serve the control API (state, pause, resume, stop, snapshot DIR) on this unix socket.
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Restore the VM saved in this snapshot directory (`ctl ... snapshot DIR`) instead of
        /// booting a kernel. Memory, vCPUs and devices must be the saved VM's; the vsock CID and
        /// socket, the console and the taps are this VM's own.
        #[arg(long, conflicts_with_all = ["kernel", "initramfs"])]
        restore: Option<PathBuf>,
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
    /// Run PROGRAM in a jail (as root): new mount, pid, ipc, uts and network namespaces, ROOT as
    /// its read-only `/` holding only the binds, an unprivileged uid/gid or only the named
    /// capabilities, no_new_privs, no core dumps. Exits as PROGRAM does (128+N for signal N).
    Jail {
        /// The host directory that becomes the jail's root.
        #[arg(long)]
        root: PathBuf,
        /// SOURCE:TARGET[:ro]: a host path the jail sees at TARGET (repeatable). A device is not
        /// bound but made anew: a node of the jailed user's own in a tmpfs private to the jail.
        #[arg(long = "bind", value_parser = hull_vmm::jail::parse_bind)]
        binds: Vec<hull_vmm::jail::JailBind>,
        /// Give the jail its own /proc/self/fd and /proc/self/mountinfo (a virtio-fs server).
        #[arg(long)]
        proc_self: bool,
        /// UID:GID to run as, with no capabilities.
        #[arg(long, value_parser = parse_ids, conflicts_with = "keep_caps")]
        user: Option<(u32, u32)>,
        /// Stay uid 0 with only these capabilities (repeatable; `chown` or `CAP_CHOWN`).
        #[arg(long = "keep-cap", value_parser = hull_vmm::jail::parse_capability)]
        keep_caps: Vec<caps::Capability>,
        /// Serve a guest's files: uid 0 with only a virtio-fs server's capabilities
        /// (FS_SERVER_CAPS) and its own /proc/self (implies --proc-self).
        #[arg(long, conflicts_with_all = ["user", "keep_caps"])]
        fs_server: bool,
        /// With --user: the most processes and threads that uid may have (RLIMIT_NPROC).
        #[arg(long, requires = "user")]
        max_processes: Option<u64>,
        /// A host file to hold a shared flock on until PROGRAM has ended (a pod's uid lease).
        #[arg(long)]
        hold_lock: Option<PathBuf>,
        /// The program (as the jail sees it) and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("UID:GID")?;
    let id = |v: &str| v.parse::<u32>().map_err(|_| format!("{v:?} is not a numeric id"));
    Ok((id(u)?, id(g)?))
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

/// Why a subcommand failed; printed as `hull-vmm: <error>`.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("Cannot create the console file {path:?}: {source}.")]
    Console { path: PathBuf, source: std::io::Error },
    #[error("Cannot limit this process to {limit} open files: {source}.")]
    OpenFiles { limit: u64, source: std::io::Error },
    #[error("Cannot start the API thread: {0}.")]
    ApiThread(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] hull_vmm::api::ApiError),
    #[error(transparent)]
    Boot(#[from] hull_vmm::builder::BootError),
    #[error(transparent)]
    Vcpu(#[from] hull_vmm::vstate::vcpu::VcpuError),
    #[error(transparent)]
    Seccomp(#[from] hull_vmm::seccomp::SeccompError),
    #[error(transparent)]
    VhostUser(#[from] hull_vmm::vhost_user::VhostUserError),
    #[error(transparent)]
    Jail(#[from] hull_vmm::jail::JailError),
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("a disk needs a path")?;
    let mut disk = DiskConfig { path: path.into(), read_only: false, id: String::new() };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            Some(("id", id)) => disk.id = id.into(),
            _ => return Err(format!("unknown disk option {opt:?} (ro, id=ID)")),
        }
    }
    Ok(disk)
}

fn parse_nic(s: &str) -> Result<NicConfig, Box<dyn std::error::Error + Send + Sync>> {
    let (mut tap, mut mac) = (None, None);
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("tap", name)) => tap = Some(TapSource::Name(name.into())),
            Some(("fd", n)) => tap = Some(TapSource::Fd(n.parse().map_err(|_| format!("{n:?} is not an fd number"))?)),
            Some(("mac", m)) => mac = Some(hull_vmm::devices::virtio::net::parse_mac(m)?),
            None if opt == "none" => tap = Some(TapSource::None),
            _ => return Err(format!("unknown net option {opt:?} (tap=NAME, fd=N or none, mac=MAC)").into()),
        }
    }
    let tap = tap.ok_or("a net device needs tap=NAME, fd=N or none")?;
    // A locally administered address when none is given.
    let mac = mac.unwrap_or([0x02, 0x68, 0x75, 0x6c, 0x6c, 0x00]);
    Ok(NicConfig { tap, mac })
}

fn parse_share(s: &str) -> Result<ShareConfig, String> {
    let (tag, dir) = s.split_once('=').ok_or("a share is TAG=DIR")?;
    Ok(ShareConfig { tag: tag.into(), server: ShareServer::InProcess(dir.into()) })
}

fn parse_vhost_user_fs(s: &str) -> Result<ShareConfig, String> {
    let (tag, socket) = s.split_once('=').ok_or("a vhost-user share is TAG=SOCKET")?;
    Ok(ShareConfig { tag: tag.into(), server: ShareServer::VhostUser(socket.into()) })
}

/// Sets RLIMIT_NOFILE, soft and hard, to `limit` or to the hard limit this process inherited if
/// that is lower: a limit only ever comes down (which needs no privilege), and nothing this
/// process runs can lift it again.
fn limit_open_files(limit: u64) -> Result<(), CliError> {
    let fail = |source| CliError::OpenFiles { limit, source };
    let mut inherited = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut inherited) } != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    let limit = limit.min(inherited.rlim_max);
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit only reads the struct, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) } != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `cmdline` followed by the words of each `--append` value, one space apart.
fn kernel_cmdline(cmdline: String, append: &[String]) -> String {
    let mut line = cmdline;
    for word in append.iter().flat_map(|a| a.split_whitespace()) {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    line
}

struct BootArgs {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    vcpus: u8,
    memory_mib: u64,
    console: PathBuf,
    devices: Devices,
    seccomp: bool,
    thread_user: Option<(u32, u32)>,
    api_socket: Option<PathBuf>,
    restore: Option<PathBuf>,
}

fn boot(BootArgs { kernel, initramfs, cmdline, vcpus, memory_mib, console, devices, seccomp, thread_user, api_socket, restore }: BootArgs) -> Result<(), CliError> {
    let console: Box<dyn std::io::Write + Send> = if console.as_os_str() == "-" {
        // fd 1 itself, unbuffered: std's stdout would hold a partial line (a prompt, the last
        // words before a hang) until a newline that may never come.
        let fd = std::io::stdout().as_fd().try_clone_to_owned().map_err(|source| CliError::Console { path: console.clone(), source })?;
        Box::new(std::fs::File::from(fd))
    } else {
        Box::new(std::fs::File::create(&console).map_err(|source| CliError::Console { path: console.clone(), source })?)
    };
    let config = VmConfig { kernel, initramfs, cmdline, vcpus, memory_mib, console, devices, seccomp, thread_user, restore };
    let listener = api_socket.as_deref().map(hull_vmm::api::bind).transpose()?;
    let vm = hull_vmm::builder::start(config)?;
    if let Some(listener) = listener {
        let controller = vm.controller();
        let filter = if seccomp { Some(hull_vmm::seccomp::api_thread()?.run_as(thread_user)) } else { None };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Some(Err(e)) = filter.map(|f| f.apply()) {
                    tracing::error!(error = %e, "the API thread cannot install its seccomp filter; no API");
                    return;
                }
                hull_vmm::api::serve(listener, controller)
            })
            .map_err(CliError::ApiThread)?;
    }
    if seccomp {
        // Everything this thread still does is waiting for the VM's end and tearing it down.
        // It keeps root under --thread-user: it runs no device code, and the parent-death
        // signal that ties this VMM to its jail lives on this thread and would be cleared by
        // a uid change (the jail sets it before exec; a thread cannot re-arm it without a race).
        hull_vmm::seccomp::main_thread().and_then(|f| f.apply())?;
    }
    let exit = vm.wait()?;
    tracing::info!(?exit, "the guest ended the VM");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `target=level` directives (no span or field filters: their regex engine was 240 KB of
    // every hull-vmm process's text); an unreadable filter logs at info.
    let filter: tracing_subscriber::filter::Targets = cli.log_level.parse().unwrap_or_else(|_| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    // Colours only for a person at a terminal; log files stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Device warnings a guest can provoke at will: at most 10 lines a call site per minute.
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(hull_vmm::log_limit::per_call_site(10, std::time::Duration::from_secs(60)));
    tracing_subscriber::registry().with(filter).with(log).init();
    // The limit first: nothing the subcommand opens comes before it.
    let mut code = ExitCode::SUCCESS;
    let result = cli.open_files.map_or(Ok(()), limit_open_files).and_then(|()| match cli.cmd {
        Cmd::Boot { kernel, initramfs, cmdline, append, vcpus, memory_mib, console, disks, nics, vsock_uds, guest_cid, mut shares, vhost_user_shares, rng, pmem, free_page_reporting, no_seccomp, thread_user, api_socket, restore } => {
            shares.extend(vhost_user_shares);
            let vsock = vsock_uds.map(|uds| VsockConfig { guest_cid, uds });
            let devices = Devices { disks, nics, vsock, shares, rng, free_page_reporting, pmem };
            let cmdline = kernel_cmdline(cmdline, &append);
            let kernel = kernel.unwrap_or_default();
            boot(BootArgs { kernel, initramfs, cmdline, vcpus, memory_mib, console, devices, seccomp: !no_seccomp, thread_user, api_socket, restore })
        }
        Cmd::Jail { root, binds, proc_self, user, keep_caps, fs_server, max_processes, hold_lock, command } => {
            let user = match user {
                Some((uid, gid)) => hull_vmm::jail::JailUser::Unprivileged { uid, gid },
                None if fs_server => hull_vmm::jail::JailUser::Root { keep: hull_vmm::jail::FS_SERVER_CAPS.to_vec() },
                None => hull_vmm::jail::JailUser::Root { keep: keep_caps },
            };
            let proc_self = proc_self || fs_server;
            let mut command = command.into_iter();
            let program = command.next().map(PathBuf::from).unwrap_or_default();
            let config = hull_vmm::jail::JailConfig { root, binds, proc_self, user, max_processes, hold_lock, program, args: command.collect() };
            hull_vmm::jail::run(&config).map(|c| code = ExitCode::from(c)).map_err(CliError::from)
        }
        Cmd::Ctl { api_socket, request } => hull_vmm::api::request(&api_socket, &request).map(|reply| println!("{reply}")).map_err(CliError::from),
        Cmd::VhostUser(cmd) => {
            // The device workers' filter, on every thread of the backend once its sockets
            // listen (before anything reaches it from a guest).
            let filter = hull_vmm::seccomp::device()?;
            match cmd {
                VhostUserCmd::Vsock { socket, uds, guest_cid } => hull_vmm::vhost_user::serve_vsock(&socket, &uds, guest_cid, Some(&filter)).map_err(CliError::from),
                VhostUserCmd::Fs { socket, shared_dir, tag } => hull_vmm::vhost_user::serve_fs(&socket, &shared_dir, &tag, Some(&filter)).map_err(CliError::from),
            }
        }
    });
    match result {
        Ok(()) => code,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("hull-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
