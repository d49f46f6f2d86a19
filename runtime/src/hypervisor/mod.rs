//! Pod VMs: one `Hypervisor` trait, one file per hypervisor. A hypervisor only starts a VM's
//! host processes (the VMM and any device backends) from a `VmSpec`; everything after that is
//! the same for all of them and lives here in `Vm`: the host reaches the guest agent through a
//! hybrid vsock socket in the VM's directory, and the processes are watched, not polled.
//!
//! Adding a hypervisor: a file with a `Hypervisor` impl, a value of `config::Hypervisor`, and
//! its arm in `Engine::hypervisor`.

pub mod backend;
pub mod builtin;
pub mod jail;
pub mod log;
pub mod qemu;
pub mod qmp;
pub mod snapshot;

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{watch, Notify};

use crate::agent::AgentConn;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{what} {path:?} does not exist.")]
    Missing { what: &'static str, path: PathBuf },
    #[error("Cannot start {what}: {source}.")]
    Spawn { what: &'static str, source: std::io::Error },
    #[error("Cannot prepare the VM's directory {path:?}: {source}.")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("Cannot read the guest root image {path:?}: {source}.")]
    RootImage { path: PathBuf, source: std::io::Error },
    #[error("The guest root image {path:?} is {bytes} bytes, not a whole number of 2 MiB pages (hull-guest-image pads it).")]
    RootImageSize { path: PathBuf, bytes: u64 },
    #[error("Cannot create the log file {path:?}: {source}.")]
    Log { path: PathBuf, source: std::io::Error },
    #[error("{what} exited with {status} before it was ready: {log}")]
    BackendExited { what: &'static str, status: String, log: String },
    #[error("A device backend did not create {0:?} within 5 s.")]
    BackendTimeout(PathBuf),
    #[error("The VMM exited with {status} before the agent answered; console: {console}")]
    VmmExited { status: String, console: String },
    #[error("The guest agent did not answer within {secs} s; console: {console}")]
    AgentTimeout { secs: u64, console: String },
    #[error("Every jail uid from {first} ({count} of them, jail_uids) is held by a running pod.")]
    NoJailUid { first: u32, count: u32 },
}

/// What runs a pod VM, as the host offers it (see `crate::host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// QEMU (KVM or TCG) driving hull's devices as vhost-user backends.
    Qemu(Accel),
    /// `hull-vmm boot`: hull's own KVM VMM with its devices in process, but the share's (a
    /// jailed vhost-user fs backend it drives).
    Builtin,
}

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The programs the hypervisors run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub qemu: PathBuf,
    /// hull-vmm: the builtin VMM, and the device backends under QEMU.
    pub vmm: PathBuf,
}

impl Engine {
    pub fn hypervisor(self, binaries: &Binaries) -> Box<dyn Hypervisor> {
        match self {
            Engine::Qemu(accel) => Box::new(qemu::Qemu { qemu: binaries.qemu.clone(), vmm: binaries.vmm.clone(), accel, mode: qemu::Mode::Boot }),
            Engine::Builtin => Box::new(builtin::Builtin { vmm: binaries.vmm.clone(), mode: builtin::Mode::Boot }),
        }
    }
}

/// A VM to start, whatever runs it.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub root: GuestRoot,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub guest_cid: u64,
    /// Extra kernel command line words.
    pub cmdline_extra: Vec<String>,
    /// Extra arguments of the VMM process (QEMU's disks, for instance).
    pub vmm_extra: Vec<String>,
    /// A host directory the guest mounts with virtio-fs.
    pub share: Option<Share>,
    /// The pod's network: a tap the VMM's virtio-net drives.
    pub nic: Option<Nic>,
    /// The most bytes each of the VM's logs (console, VMM, backends) keeps.
    pub log_cap: u64,
    /// The most files each VM process may hold open (see `Config::vm_open_files`).
    pub open_files: u64,
    /// Run every VM process in `hull-vmm jail` (see `jail`), or (None) directly as root.
    pub jail: Option<jail::Jail>,
}

/// Where the guest's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRoot {
    /// An erofs image on a read-only virtio-pmem device, read in place (DAX): nothing of it is
    /// copied into guest memory, and every VM reads the same host pages of the file.
    Image(PathBuf),
    /// An initramfs the kernel unpacks into guest memory.
    Initramfs(PathBuf),
}

/// The guest's only pmem device.
pub const ROOT_DEVICE: &str = "/dev/pmem0";

impl GuestRoot {
    pub fn path(&self) -> &Path {
        match self {
            GuestRoot::Image(p) | GuestRoot::Initramfs(p) => p,
        }
    }

    /// The kernel command line words that mount it. An initramfs needs none: the kernel runs its /init.
    pub fn cmdline(&self) -> Vec<String> {
        match self {
            GuestRoot::Image(_) => [&format!("root={ROOT_DEVICE}"), "rootfstype=erofs", "rootflags=dax=always", "ro", "init=/init"].into_iter().map(|w| w.to_string()).collect(),
            GuestRoot::Initramfs(_) => Vec::new(),
        }
    }
}

/// The size of a root image, which a VM maps in 2 MiB pages (the guest hot-plugs it as device
/// memory in sections of that size).
pub fn root_image_size(path: &Path) -> Result<u64, HypervisorError> {
    let bytes = std::fs::metadata(path).map_err(|source| HypervisorError::RootImage { path: path.into(), source })?.len();
    if bytes == 0 || bytes % (2 << 20) != 0 {
        return Err(HypervisorError::RootImageSize { path: path.into(), bytes });
    }
    Ok(bytes)
}

/// A host directory exported to the guest as virtio-fs `tag`.
#[derive(Debug, Clone)]
pub struct Share {
    pub tag: String,
    pub dir: PathBuf,
}

/// A virtio-net NIC backed by a tap the caller opened (in the pod's network namespace, which
/// the VMM is not in, so it cannot open it by name). The caller keeps `tap_fd` open until
/// `Vm::start` returns; the VMM inherits its own copy.
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap_fd: RawFd,
    /// The guest NIC's MAC address ("aa:bb:cc:dd:ee:ff").
    pub mac: String,
}

const CONSOLE: &str = "console.log";

/// The VM's files: its console and process logs, its sockets in `run/`, the jail's root in
/// `root/` (see `jail`), in one directory nothing else uses.
#[derive(Debug, Clone)]
pub struct VmDir(PathBuf);

impl VmDir {
    pub fn new(path: impl Into<PathBuf>) -> VmDir {
        VmDir(path.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// The hybrid vsock socket: `CONNECT <port>` reaches the guest.
    pub fn vsock(&self) -> PathBuf {
        self.run().join("vsock.sock")
    }
    /// The VM processes' sockets (the jail's `/run`).
    pub fn run(&self) -> PathBuf {
        self.0.join("run")
    }
    /// Where the jails' roots are, one directory per VM process (`jail::Placement::command`).
    pub fn jail_root(&self) -> PathBuf {
        self.0.join("root")
    }
    /// Guest RAM as a file (snapshots' VMs; `jail::prepare_memory`).
    pub fn memory(&self) -> PathBuf {
        self.0.join("memory")
    }
    /// The guest's serial console.
    pub fn console(&self) -> PathBuf {
        self.0.join(CONSOLE)
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// A started VM's processes, as a hypervisor hands them over.
pub struct Launched {
    /// QEMU or hull-vmm.
    pub vmm: Command,
    /// Its own log in the VM directory.
    pub vmm_log: &'static str,
    /// Device backends, already serving (vsock first).
    pub backends: Vec<Watched>,
}

/// What runs a pod VM.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync {
    /// For logs and errors.
    fn name(&self) -> &'static str;
    /// Starts whatever must serve before the VMM (device backends) and returns the VMM's
    /// command: its hybrid vsock socket at `dir.vsock()`, the guest console on its stdout.
    async fn prepare(&self, spec: &VmSpec, dir: &VmDir) -> Result<Launched, HypervisorError>;
}

pub(crate) fn exists(what: &'static str, p: &Path) -> Result<(), HypervisorError> {
    if p.exists() { Ok(()) } else { Err(HypervisorError::Missing { what, path: p.into() }) }
}

/// Where a VM process's output goes: capped logs in the VM directory (see `log`), never the
/// terminal of whoever runs the container.
pub struct Logs<'a> {
    pub dir: &'a VmDir,
    /// stdout's log (the guest console, for a VMM), or None for no stdout.
    pub stdout: Option<&'a str>,
    pub stderr: &'a str,
    pub cap: u64,
}

impl Logs<'_> {
    /// Creates the log files and points the child's output at pipes for them: stdout's log
    /// (if any) and stderr's.
    fn prepare(&self, cmd: &mut Command) -> Result<(Option<log::CappedLog>, log::CappedLog), HypervisorError> {
        let create = |name: &str| {
            let path = self.dir.file(name);
            log::CappedLog::create(&path, self.cap).map_err(|source| HypervisorError::Log { path, source })
        };
        let stdout = self.stdout.map(&create).transpose()?;
        cmd.stdin(Stdio::null()).stdout(if stdout.is_some() { Stdio::piped() } else { Stdio::null() }).stderr(Stdio::piped());
        Ok((stdout, create(self.stderr)?))
    }
}

/// The descriptor number the VMM (QEMU or hull-vmm) finds the tap at.
pub const TAP_FD: RawFd = 3;

/// Makes the child of `cmd` find `fd` (the caller's tap) at TAP_FD.
pub(crate) fn pass_tap(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and
    // fcntl, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.as_std_mut().pre_exec(move || {
            // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
            let r = if fd == TAP_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, TAP_FD) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process whose exit is published as it happens: a task owns it, reaps it, and kills
/// it when asked (or when the runtime goes away: kill_on_drop).
pub struct Watched {
    pid: u32,
    status: watch::Receiver<Option<ExitStatus>>,
    kill: Arc<Notify>,
    /// The tasks relaying its stdout and stderr into their logs.
    relays: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Watched {
    /// Spawns `cmd` with its output relayed into `logs`; must run inside a tokio runtime.
    pub fn spawn(cmd: &mut Command, what: &'static str, logs: &Logs) -> Result<Watched, HypervisorError> {
        let (stdout_log, stderr_log) = logs.prepare(cmd)?;
        let mut child = cmd.kill_on_drop(true).spawn().map_err(|source| HypervisorError::Spawn { what, source })?;
        let pid = child.id().unwrap_or(0);
        let mut relays = Vec::new();
        if let (Some(out), Some(log)) = (child.stdout.take(), stdout_log) {
            relays.push(tokio::spawn(log::relay(out, log)));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(tokio::spawn(log::relay(err, stderr_log)));
        }
        let (tx, status) = watch::channel(None);
        let kill = Arc::new(Notify::new());
        let asked = kill.clone();
        tokio::spawn(async move {
            let exited = tokio::select! {
                s = child.wait() => Some(s),
                _ = asked.notified() => None,
            };
            let status = match exited {
                Some(s) => s,
                // A jail's process first: its waiter exits once it has reaped it, so the pod's
                // uid lease it holds outlives every process of the uid. The waiter itself only
                // if it does not.
                None if jail::kill_jailed(pid) => match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                },
                None => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            match status {
                Ok(s) => {
                    tx.send_replace(Some(s));
                }
                Err(e) => tracing::error!(pid, error = %e, "cannot wait for a VM process"),
            }
        });
        Ok(Watched { pid, status, kill, relays: tokio::sync::Mutex::new(relays) })
    }

    /// Waits (at most `limit`) until everything the exited process wrote is in its logs: the
    /// relays end at the pipes' EOF, a little after the exit itself.
    pub async fn logs_complete(&self, limit: Duration) {
        let relays = std::mem::take(&mut *self.relays.lock().await);
        let _ = tokio::time::timeout(limit, futures_util::future::join_all(relays)).await;
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it exited, if it has.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.status.borrow()
    }

    /// Waits for it to exit, at most `limit`.
    pub async fn wait(&self, limit: Duration) -> Option<ExitStatus> {
        let mut rx = self.status.clone();
        let status = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await.ok()?.ok()?;
        *status
    }

    /// Waits for it to exit, however long that takes.
    pub async fn ended(&self) -> Option<ExitStatus> {
        let mut rx = self.status.clone();
        let status = rx.wait_for(Option::is_some).await.ok()?;
        *status
    }

    /// Kills it (if it still runs) and waits until it is reaped.
    pub async fn kill(&self) -> Option<ExitStatus> {
        if self.exited().is_none() {
            self.kill.notify_one();
        }
        self.ended().await
    }
}

impl Drop for Watched {
    /// A VM process does not outlive its handle: a VM dropped on an error path is gone too.
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill.notify_one();
        }
    }
}

/// A running pod VM: the VMM, its device backends and the way to its agent.
pub struct Vm {
    dir: VmDir,
    vmm: Watched,
    /// The VMM's own log in `dir`.
    vmm_log: &'static str,
    /// The vhost-user backends (QEMU: vsock, then fs if a directory is shared; builtin: fs).
    backends: Vec<Watched>,
}

impl Vm {
    /// Starts the VM under `hypervisor` with its files in `dir`. On failure nothing is left
    /// running.
    pub async fn start(hypervisor: &dyn Hypervisor, spec: &VmSpec, dir: VmDir) -> Result<Vm, HypervisorError> {
        exists("The guest kernel", &spec.kernel)?;
        match &spec.root {
            GuestRoot::Image(p) => exists("The guest root image", p)?,
            GuestRoot::Initramfs(p) => exists("The guest initramfs", p)?,
        }
        if let Some(share) = &spec.share {
            exists("The shared directory", &share.dir)?;
        }
        jail::prepare_dirs(spec, &dir)?;
        let Launched { mut vmm, vmm_log, backends } = hypervisor.prepare(spec, &dir).await?;
        // The VMM's stdout is the guest's serial console.
        let logs = Logs { dir: &dir, stdout: Some(CONSOLE), stderr: vmm_log, cap: spec.log_cap };
        let vmm = match Watched::spawn(&mut vmm, hypervisor.name(), &logs) {
            Ok(v) => v,
            Err(e) => {
                for b in &backends {
                    b.kill().await;
                }
                return Err(e);
            }
        };
        Ok(Vm { dir, vmm, vmm_log, backends })
    }

    pub fn dir(&self) -> &VmDir {
        &self.dir
    }

    /// The VMM's own log (QEMU's or hull-vmm's stderr).
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.file(self.vmm_log)
    }

    /// The last lines of the guest console: they say why a boot failed.
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.console()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits until the agent answers Check over vsock; returns a connection to it.
    pub async fn wait_for_agent(&self, timeout: Duration) -> Result<AgentConn, HypervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.vmm.exited() {
                self.vmm.logs_complete(Duration::from_secs(2)).await;
                let log = std::fs::read_to_string(self.dir.file(self.vmm_log)).unwrap_or_default();
                let console = format!("{}\n{}", log.trim_end(), self.console_tail());
                return Err(HypervisorError::VmmExited { status: status.to_string(), console });
            }
            if let Ok(conn) = AgentConn::connect_hybrid_vsock(&self.dir.vsock()).await {
                if conn.check().await.unwrap_or(false) {
                    return Ok(conn);
                }
            }
            if Instant::now() > deadline {
                return Err(HypervisorError::AgentTimeout { secs: timeout.as_secs(), console: self.console_tail() });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The VMM's exit status, if it has exited (it died, or the guest powered off), else that
    /// of a device backend that died: without it the VM cannot go on.
    pub fn exited(&self) -> Option<ExitStatus> {
        std::iter::once(&self.vmm).chain(&self.backends).find_map(Watched::exited)
    }

    /// Waits for the VMM to exit on its own, at most `limit`.
    pub async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        self.vmm.wait(limit).await
    }

    /// Waits until the VM has ended, however long that takes: its VMM exited, or one of its
    /// device backends died, in which case the rest is killed (a VM whose vsock or share is
    /// gone cannot go on, and must not be left running).
    pub async fn ended(&self) -> Option<ExitStatus> {
        let processes = std::iter::once(&self.vmm).chain(&self.backends).map(|p| Box::pin(p.ended()));
        let (status, index, _) = futures_util::future::select_all(processes).await;
        if index > 0 {
            // A backend exits cleanly once its VMM's connection closes: when the VMM died first
            // (a crash, the host's OOM killer), the VMM's end is the news, not the backend's.
            if let Ok(Some(vmm)) = tokio::time::timeout(Duration::from_millis(500), self.vmm.ended()).await {
                self.kill().await;
                return Some(vmm);
            }
            let pid = self.backends[index - 1].pid();
            tracing::error!(backend_pid = pid, status = ?status, "a device backend of the pod VM died; killing the VM");
            self.kill().await;
        }
        status
    }

    /// Waits up to `limit` for every backend to exit; returns how each did.
    pub async fn backends_wait(&self, limit: Duration) -> Vec<Option<ExitStatus>> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        for b in &self.backends {
            out.push(b.wait(deadline.saturating_duration_since(tokio::time::Instant::now())).await);
        }
        out
    }

    /// Kills the VMM and the backends and waits until they are reaped and their logs
    /// complete.
    pub async fn kill(&self) {
        for p in std::iter::once(&self.vmm).chain(&self.backends) {
            p.kill().await;
            p.logs_complete(Duration::from_secs(2)).await;
        }
    }

    /// The VMM's pid: what containerd sees as the pid of every task of the pod.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid()
    }

    /// Every process of the VM, the VMM first.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.vmm).chain(&self.backends).map(Watched::pid).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ending a VM process that runs another under it (as `hull-vmm jail` does) kills the one
    /// under it first and lets the waiter reap it and exit on its own: a waiter that held the
    /// pod's uid lease holds it until the last process of the uid is gone. Here a shell stands
    /// for the waiter; it exits 0 once its child is reaped, where a kill would end it with
    /// SIGKILL.
    #[tokio::test]
    async fn a_waiter_outlives_the_process_it_waits_for() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = VmDir::new(dir.path());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 1000 & wait; exit 0"]);
        let waiter = Watched::spawn(&mut cmd, "test waiter", &Logs { dir: &vm_dir, stdout: None, stderr: "waiter.log", cap: 4096 }).unwrap();
        let children = format!("/proc/{0}/task/{0}/children", waiter.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&children).unwrap_or_default().trim().is_empty() {
            assert!(Instant::now() < deadline, "the shell never started its child");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = waiter.kill().await.expect("the waiter's status");
        assert_eq!(status.code(), Some(0), "the waiter was killed, not left to exit: {status}");
    }
}
