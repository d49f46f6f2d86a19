//! Pods restored from a snapshot instead of booted (`Config::snapshots`), on either engine.
//!
//! The builtin engine: hull-vmm saves its template itself (`hull-vmm ctl ... snapshot`, see
//! hull-vmm's `snapshot`) with the pod's devices in place (its NIC without a tap, its share on
//! a backend of its own serving an empty directory; the guest has mounted neither), into the
//! template's memory directory, and the runtime keeps `vm.json` and `memory` from there. A pod
//! restored from it is `hull-vmm boot --restore` with the pod's own tap, share backend and
//! vsock CID (the guest takes its new CID from a transport reset, and its agent gives the NIC
//! the pod's MAC); then CreateSandbox gives it the wall clock and fresh entropy.
//!
//! QEMU: a snapshot is a VM booted from hull's kernel and root (image or initramfs) to agent ready, saved: no tenant
//! has run anything in it, and it has no pod's devices (QEMU 7.2 cannot migrate vhost-user ones;
//! its vsock is ejected before the save). Its guest RAM lives in a file (`jail::prepare_memory`),
//! kept as `memory` (the pages with data only), and QEMU's migration stream, `state`, holds the
//! rest (x-ignore-shared: not the RAM). A restored VM starts from its own copy of `memory`
//! (nothing writable is shared between pods; a memfd would not do: QEMU's load of zero pages
//! reads each, and a shared memfd backs every page read), loads `state`, gets the pod's share,
//! NIC and vsock hot-plugged on the slots a booted VM has them on (so the vsock CID and the MAC
//! are the pod's), and then its agent gets the wall clock and fresh entropy with CreateSandbox,
//! before anything of the pod runs (the agent's identity.rs).
//!
//! One snapshot per engine and VM size lives in `snapshot_dir`, in a directory named after what
//! made it (`Made`): kernel and root content, QEMU, the machine's command line. A
//! snapshot made by anything else is never loaded: the first pod that finds one removes it,
//! saying what changed, and makes a new one.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::builtin::{self, Builtin, API_SOCKET};
use super::jail::Placement;
use super::qemu::{self, Mode, Qemu, INCOMING_SOCKET};
use super::qmp::{Qmp, QmpError, QMP_SOCKET};
use super::{Accel, Engine, GuestRoot, HypervisorError, Share, Vm, VmDir, VmSpec};
use crate::agent::client::AgentConn;

/// Bumped when what a snapshot holds changes in a way `Made` does not see.
/// 2: the root is recorded as what it is (image or initramfs) with its content's hash.
/// 3: the VMM program is recorded as `vmm` (QEMU, or hull-vmm for the builtin engine).
const FORMAT: u32 = 3;
/// The socket QEMU saves a template to.
const SAVE_SOCKET: &str = "snapshot.sock";
const STATE: &str = "state";
const MEMORY: &str = "memory";
/// What a migration stream without the RAM holds (devices, CPUs, firmware ROMs) stays far
/// below this.
const MAX_STATE: u64 = 64 << 20;
const MADE: &str = "made.json";
/// The kernel's and root's digests, by file identity (`sha256_of`).
const DIGESTS: &str = ".digests";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("Cannot {what} {path:?}: {source}.")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("Another pod is making the snapshot {0:?}.")]
    Busy(PathBuf),
    #[error("The snapshot's template VM failed: {0}")]
    Template(#[source] HypervisorError),
    #[error("The restored VM failed: {0}")]
    Restore(#[source] HypervisorError),
    #[error("QEMU's QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("QEMU saved more than {} MiB of state besides the RAM: not a snapshot of this VM.", MAX_STATE >> 20)]
    TooBig,
    #[error("QEMU did not {what} within {secs} s.")]
    Timeout { what: &'static str, secs: u64 },
    #[error("QEMU stopped while {what}; its log: {log}")]
    QemuExited { what: &'static str, log: String },
    #[error("hull-vmm refused {request:?}: {reply}")]
    VmmRefused { request: String, reply: String },
    #[error("hull-vmm did not answer {request:?} within {secs} s.")]
    VmmTimeout { request: String, secs: u64 },
    #[error("The restored hull-vmm stopped before its agent answered: {0}")]
    VmmExited(#[source] HypervisorError),
    #[error("The template's {what} is not a regular file: {path:?}.")]
    NotAFile { what: &'static str, path: PathBuf },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Listens at `name` in `dir` (a pod's socket directory: its path is longer than a socket
/// address takes), bound through the directory's descriptor, never following a link there.
fn bind_in(dir: &Path, name: &str) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let d = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir)?;
    tokio::net::UnixListener::bind(format!("/proc/self/fd/{}/{name}", d.as_raw_fd()))
}

/// QEMU's migration leaves out guest RAM that is shared (the RAM file): a snapshot keeps it
/// beside the stream, and a restored VM maps a copy of it.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

const PAGE: usize = 4096;

/// Copies the pages of `src` that hold data into a new file `dst` of `len` bytes, at the same
/// offsets, owned by `owner`: holes and all-zero pages stay holes, so the copy takes only the
/// memory (or disk) the guest's data needs. Returns the bytes written.
fn copy_pages(src: &Path, dst: &Path, len: u64, owner: Option<(u32, u32)>) -> std::io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    // The source may be a VM's RAM file, in a directory its QEMU can write: the file itself,
    // never where a link there points.
    // Not blocking either: a FIFO planted there would hold the open forever.
    let from = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(src)?;
    if !from.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a regular file", src.display())));
    }
    let _ = std::fs::remove_file(dst);
    let to = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&to, Some(uid), Some(gid))?;
    }
    to.set_len(len)?;
    let end = from.metadata()?.len().min(len) as i64;
    let mut buf = vec![0u8; 1 << 20];
    let (mut offset, mut written) = (0i64, 0u64);
    while offset < end {
        let data = match lseek(from.as_raw_fd(), offset, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::Error::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(from.as_raw_fd(), data, Whence::SeekHole)?.min(end);
        let mut at = data;
        while at < hole {
            let n = (buf.len() as i64).min(hole - at) as usize;
            from.read_exact_at(&mut buf[..n], at as u64)?;
            // Runs of pages with data, each written once.
            let mut run: Option<usize> = None;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let zero = page.iter().all(|&b| b == 0);
                match (zero, run) {
                    (false, None) => run = Some(i * PAGE),
                    (true, Some(start)) => {
                        to.write_all_at(&buf[start..i * PAGE], at as u64 + start as u64)?;
                        written += (i * PAGE - start) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(start) = run {
                to.write_all_at(&buf[start..n], at as u64 + start as u64)?;
                written += (n - start) as u64;
            }
            at += n as i64;
        }
        offset = hole;
    }
    Ok(written)
}

/// What made a snapshot: a snapshot is only loaded by a VM that would be made the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Made {
    format: u32,
    engine: String,
    kernel_sha256: String,
    /// `image` or `initramfs`, and the SHA-256 of its content.
    root: String,
    root_sha256: String,
    /// The VMM program's path, size and modification time (QEMU, or hull-vmm for the builtin
    /// engine): an upgrade changes its machine, or its snapshot format.
    vmm: String,
    vcpus: u32,
    memory_mib: u32,
    cmdline_extra: Vec<String>,
}

/// The SHA-256 of the file at `path`, remembered in `digests` under the file's identity
/// (device, inode, size, modification and change times). Every restored pod checks the kernel
/// and root it would boot against its snapshot's; hashing them again each time (24 MB) cost
/// each pod's start tens of milliseconds. Nothing rewrites a file without a new change time
/// (ctime cannot be set from user space), and a file that changes while it is hashed is not
/// remembered. `digests` is under `snapshot_dir`, the host's own, which no guest writes.
fn sha256_of(path: &Path, digests: &Path) -> Result<String, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let identity = |m: &std::fs::Metadata| {
        format!("{}\0{}\0{}\0{}\0{}.{}\0{}.{}", path.display(), m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
    };
    let mut file = std::fs::File::open(path).map_err(io("read", path))?;
    let before = file.metadata().map_err(io("read", path))?;
    let key = digests.join(format!("{:x}", Sha256::digest(identity(&before).as_bytes())));
    if let Ok(known) = std::fs::read_to_string(&key) {
        if known.len() == 64 && known.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(known);
        }
    }
    let mut hash = Sha256::new();
    std::io::copy(&mut file, &mut hash).map_err(io("read", path))?;
    let digest = format!("{:x}", hash.finalize());
    let after = std::fs::metadata(path).map_err(io("read", path))?;
    if identity(&after) == identity(&before) {
        // Best effort: a digest not remembered is computed again next time.
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(digests);
        let partial = key.with_extension(format!("{}.partial", std::process::id()));
        if std::fs::write(&partial, &digest).is_ok() && std::fs::rename(&partial, &key).is_err() {
            let _ = std::fs::remove_file(&partial);
        }
    }
    Ok(digest)
}

/// Removes every remembered digest but `keep` (a digest's file holds the digest).
fn forget_digests_but(digests: &Path, keep: &[&str]) {
    for entry in std::fs::read_dir(digests).into_iter().flatten().flatten() {
        if !std::fs::read_to_string(entry.path()).is_ok_and(|d| keep.contains(&d.as_str())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Made {
    fn of(engine: &str, vmm: &Path, spec: &VmSpec, digests: &Path) -> Result<Made, SnapshotError> {
        let resolved = super::jail::resolve(vmm).map_err(SnapshotError::Restore)?;
        let meta = std::fs::metadata(&resolved).map_err(io("read", &resolved))?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
        Ok(Made {
            format: FORMAT,
            engine: engine.into(),
            kernel_sha256: sha256_of(&spec.kernel, digests)?,
            root: match spec.root {
                GuestRoot::Image(_) => "image".into(),
                GuestRoot::Initramfs(_) => "initramfs".into(),
            },
            root_sha256: sha256_of(spec.root.path(), digests)?,
            vmm: format!("{} {} bytes, modified {}.{:09}", resolved.display(), meta.len(), mtime.as_secs(), mtime.subsec_nanos()),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cmdline_extra: spec.cmdline_extra.clone(),
        })
    }

    /// Snapshots of one family differ only in what made them; one is kept per family.
    fn family(&self) -> String {
        format!("{}-{}c-{}m", self.engine, self.vcpus, self.memory_mib)
    }

    fn dir_name(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let hash = format!("{:x}", Sha256::digest(text.as_bytes()));
        format!("{}-{}", self.family(), &hash[..16])
    }

    /// What differs from `other`, for the log line that says why a snapshot is not used.
    fn changed_from(&self, other: &Made) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (what, differs) in [
            ("format", self.format != other.format),
            ("kernel", self.kernel_sha256 != other.kernel_sha256),
            ("root", self.root != other.root || self.root_sha256 != other.root_sha256),
            ("vmm", self.vmm != other.vmm),
            ("kernel_params", self.cmdline_extra != other.cmdline_extra),
        ] {
            if differs {
                out.push(what);
            }
        }
        out
    }
}

/// Restores pods of one engine from snapshots in `dir`.
pub struct Snapshots {
    pub dir: PathBuf,
    pub qemu: PathBuf,
    pub vmm: PathBuf,
    pub engine: Engine,
    /// For the template's boot.
    pub boot_timeout: Duration,
}

/// The files of a builtin snapshot, as hull-vmm writes and reads them.
const BUILTIN_STATE: &str = "vm.json";
/// The largest `vm.json` hull-vmm reads (its `snapshot::MAX_STATE`).
const BUILTIN_MAX_STATE: u64 = 16 << 20;

impl Snapshots {
    fn engine(&self, mode: Mode) -> Qemu {
        let accel = match self.engine {
            Engine::Qemu(accel) => accel,
            Engine::Builtin => Accel::Kvm,
        };
        Qemu { qemu: self.qemu.clone(), vmm: self.vmm.clone(), accel, mode }
    }

    /// The engine as a snapshot's family names it. A builtin snapshot holds the pod's devices,
    /// so a pod with a NIC and one without have snapshots of their own.
    fn engine_name(&self, spec: &VmSpec) -> &'static str {
        match (self.engine, spec.nic.is_some()) {
            (Engine::Qemu(Accel::Kvm), _) => "qemu-kvm",
            (Engine::Qemu(Accel::Tcg), _) => "qemu-tcg",
            (Engine::Builtin, false) => "builtin",
            (Engine::Builtin, true) => "builtin-nic",
        }
    }

    /// The program whose upgrade makes a snapshot stale.
    fn vmm_program(&self) -> PathBuf {
        match self.engine {
            Engine::Qemu(_) => self.qemu.clone(),
            Engine::Builtin => self.vmm.clone(),
        }
    }

    /// Starts the pod VM of `spec` in `dir` from its snapshot, making the snapshot first (in a
    /// template VM in `template_dir`) if there is none. Returns the VM with the pod's devices
    /// plugged in, and its agent's connection if the restore already waited for it (the
    /// builtin engine); otherwise its agent is waited for as a booted one's. `started` sees the
    /// VM as soon as its processes run (the pod records their pids). On failure nothing is
    /// left running.
    pub async fn restore(&self, spec: &VmSpec, dir: VmDir, template_dir: VmDir, started: &(dyn Fn(&Vm) + Sync)) -> Result<(Vm, Option<AgentConn>), SnapshotError> {
        let (engine, program, want, digests) = (self.engine_name(spec), self.vmm_program(), spec.clone(), self.dir.join(DIGESTS));
        let checking = Instant::now();
        let made = tokio::task::spawn_blocking(move || Made::of(engine, &program, &want, &digests)).await.map_err(|e| SnapshotError::Io {
            what: "hash the guest image for",
            path: spec.kernel.clone(),
            source: std::io::Error::other(e),
        })??;
        let at = self.dir.join(made.dir_name());
        if !at.join(MADE).exists() {
            self.make(spec, &made, &at, template_dir).await?;
        }
        // Read back, not trusted from the name: a snapshot is loaded by the VM that made it.
        let text = std::fs::read(at.join(MADE)).map_err(io("read", &at.join(MADE)))?;
        let theirs: Made = serde_json::from_slice(&text).map_err(|e| SnapshotError::Io { what: "parse", path: at.join(MADE), source: e.into() })?;
        if theirs != made {
            let _ = std::fs::remove_dir_all(&at);
            return Err(SnapshotError::Io { what: "use", path: at, source: std::io::Error::other(format!("made by another {}", made.changed_from(&theirs).join(", "))) });
        }
        let check_ms = checking.elapsed().as_millis() as u64;
        if self.engine == Engine::Builtin {
            return self.start_builtin(spec, &at, dir, started, check_ms).await.map(|(vm, conn)| (vm, Some(conn)));
        }
        let state = tokio::fs::File::open(at.join(STATE)).await.map_err(io("open", &at.join(STATE)))?;
        // The VM's RAM, its own copy, in place before QEMU maps it.
        std::fs::create_dir_all(dir.path()).map_err(io("create", dir.path()))?;
        let ram = super::jail::prepare_memory(spec, &dir).map_err(SnapshotError::Restore)?;
        let result = self.start_from(spec, &at, &ram, state, dir, started).await.map(|vm| (vm, None));
        if let Err(e) = &result {
            // The pod boots instead, with memory of its own: the copy would hold its pages
            // until the pod ends.
            let _ = std::fs::remove_file(&ram);
            if matches!(e, SnapshotError::QemuExited { .. } | SnapshotError::VmmExited(_)) {
                // QEMU refused the snapshot itself: the next pod makes a new one.
                tracing::warn!(snapshot = ?at, error = %e, "snapshot QEMU cannot load: removed");
                let _ = std::fs::remove_dir_all(&at);
            }
        }
        result
    }

    /// `hull-vmm boot --restore` on the snapshot at `at` with the pod's devices, until its
    /// agent answers (the VM's own copy of the memory is made by hull-vmm). A hull-vmm that
    /// refuses the snapshot removes it: the next pod makes a new one.
    async fn start_builtin(&self, spec: &VmSpec, at: &Path, dir: VmDir, started: &(dyn Fn(&Vm) + Sync), check_ms: u64) -> Result<(Vm, AgentConn), SnapshotError> {
        let starting = Instant::now();
        std::fs::create_dir_all(dir.path()).map_err(io("create", dir.path()))?;
        let restore = Builtin { vmm: self.vmm.clone(), mode: builtin::Mode::Restore(at.to_path_buf()) };
        let vm = Vm::start(&restore, spec, dir).await.map_err(SnapshotError::Restore)?;
        started(&vm);
        let start_ms = starting.elapsed().as_millis() as u64;
        match vm.wait_for_agent(self.boot_timeout).await {
            Ok(conn) => {
                tracing::info!(check_ms, start_ms, agent_ms = starting.elapsed().as_millis() as u64 - start_ms, "pod VM restored, its agent answering");
                Ok((vm, conn))
            }
            Err(e) => {
                // A VMM that refused the snapshot, or a restored guest that never answered: the
                // next pod makes a new one rather than wait on this one again.
                vm.kill().await;
                tracing::warn!(snapshot = ?at, error = %e, "hull-vmm cannot restore the snapshot: removed");
                let _ = std::fs::remove_dir_all(at);
                Err(SnapshotError::VmmExited(e))
            }
        }
    }

    /// Copies the snapshot's memory to `ram`, starts QEMU on it and loads `state` into it.
    async fn start_from(&self, spec: &VmSpec, at: &Path, ram: &Path, state: tokio::fs::File, dir: VmDir, started: &(dyn Fn(&Vm) + Sync)) -> Result<Vm, SnapshotError> {
        let (from, to, size, owner) = (at.join(MEMORY), ram.to_path_buf(), u64::from(spec.memory_mib) << 20, spec.jail.map(|j| (j.uid, j.gid)));
        tokio::task::spawn_blocking(move || copy_pages(&from, &to, size, owner))
            .await
            .map_err(|e| SnapshotError::Io { what: "copy the snapshot's memory to", path: ram.into(), source: std::io::Error::other(e) })?
            .map_err(io("copy the snapshot's memory to", ram))?;
        let incoming = format!("unix:{}", Placement { spec, dir: &dir, vmm: &self.vmm }.socket(INCOMING_SOCKET).display());
        let vm = Vm::start(&self.engine(Mode::Restore), spec, dir).await.map_err(SnapshotError::Restore)?;
        started(&vm);
        match Self::load_and_plug(&vm, spec, state, &incoming).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }

    /// Streams the snapshot into the restoring QEMU, waits until it runs, and hot-plugs the
    /// pod's devices.
    async fn load_and_plug(vm: &Vm, spec: &VmSpec, mut state: tokio::fs::File, incoming: &str) -> Result<(), SnapshotError> {
        let run = vm.dir().run();
        let limit = Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        let started = Instant::now();
        let mut qmp = match Qmp::connect(&run.join(QMP_SOCKET), limit).await {
            Ok(q) => q,
            Err(_) if vm.exited().is_some() => return Err(Self::exited(vm, "starting to restore").await),
            Err(e) => return Err(e.into()),
        };
        qmp.execute("migrate-set-capabilities", ignore_shared()).await?;
        qmp.execute("migrate-incoming", json!({ "uri": incoming })).await?;
        let mut stream = loop {
            match crate::agent::client::connect_socket_file(&run.join(INCOMING_SOCKET)).await {
                Ok(s) => break s,
                Err(_) if vm.exited().is_some() => return Err(Self::exited(vm, "starting to restore").await),
                Err(_) if Instant::now() > deadline => return Err(SnapshotError::Timeout { what: "listen for its snapshot", secs: limit.as_secs() }),
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        if let Err(e) = tokio::io::copy(&mut state, &mut stream).await {
            if vm.exited().is_some() {
                return Err(Self::exited(vm, "loading its snapshot").await);
            }
            return Err(SnapshotError::Io { what: "stream the snapshot to QEMU at", path: run.join(INCOMING_SOCKET), source: e });
        }
        drop(stream);
        // The template was stopped when it was saved, and QEMU restores that: once loaded the
        // VM is paused and is continued here.
        loop {
            let status = match qmp.execute("query-status", json!({})).await {
                Ok(s) => s,
                Err(QmpError::Closed) | Err(QmpError::Io(_)) => return Err(Self::exited(vm, "loading its snapshot").await),
                Err(e) => return Err(e.into()),
            };
            match status.get("status").and_then(|s| s.as_str()) {
                Some("running") => break,
                Some("paused") | Some("postmigrate") => {
                    qmp.execute("cont", json!({})).await?;
                    break;
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(SnapshotError::Timeout { what: "run the restored VM", secs: limit.as_secs() });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let loaded = started.elapsed();
        for (id, args) in qemu::hotplug(spec) {
            qmp.execute("device_add", args).await.map_err(|e| match e {
                QmpError::Refused { desc, .. } => QmpError::Refused { command: format!("device_add {id}"), desc },
                e => e,
            })?;
        }
        tracing::info!(load_ms = loaded.as_millis() as u64, plug_ms = (started.elapsed() - loaded).as_millis() as u64, "pod VM restored, its devices plugged");
        Ok(())
    }

    async fn exited(vm: &Vm, what: &'static str) -> SnapshotError {
        vm.kill().await;
        let log = std::fs::read_to_string(vm.dir().file("qemu.log")).unwrap_or_default();
        SnapshotError::QemuExited { what, log: log.trim().chars().take(2000).collect() }
    }

    /// Boots a template VM, saves it to `at`, and removes the family's other snapshots.
    async fn make(&self, spec: &VmSpec, made: &Made, at: &Path, template_dir: VmDir) -> Result<(), SnapshotError> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io("create", &self.dir))?;
        let lock_path = self.dir.join(format!("{}.lock", made.family()));
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io("open", &lock_path))?;
        // One pod makes a family's snapshot; the others boot meanwhile rather than wait.
        let Ok(_held) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
            return Err(SnapshotError::Busy(at.into()));
        };
        if at.join(MADE).exists() {
            return Ok(());
        }
        for stale in std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))?.flatten() {
            let name = stale.file_name().to_string_lossy().into_owned();
            let family = format!("{}-", made.family());
            if !name.starts_with(&family) || !stale.path().is_dir() || name.starts_with('.') {
                continue;
            }
            let theirs: Option<Made> = std::fs::read(stale.path().join(MADE)).ok().and_then(|t| serde_json::from_slice(&t).ok());
            let changed = theirs.map(|t| made.changed_from(&t).join(", ")).unwrap_or_else(|| "unreadable".into());
            tracing::info!(snapshot = ?stale.path(), changed, "snapshot made by another kernel, root, QEMU or config: removed, not loaded");
            let _ = std::fs::remove_dir_all(stale.path());
        }
        // Digests of files since replaced would pile up: only this snapshot's are kept.
        forget_digests_but(&self.dir.join(DIGESTS), &[&made.kernel_sha256, &made.root_sha256]);
        let building = self.dir.join(format!(".{}.building", made.dir_name()));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::DirBuilder::new().mode(0o700).create(&building).map_err(io("create", &building))?;
        let started = Instant::now();
        let result = self.save_template(spec, &building, template_dir).await;
        let result = result.and_then(|size| {
            let text = serde_json::to_vec_pretty(made).unwrap_or_default();
            let path = building.join(MADE);
            let mut f = std::fs::File::create(&path).map_err(io("write", &path))?;
            f.write_all(&text).and_then(|_| f.sync_all()).map_err(io("write", &path))?;
            std::fs::rename(&building, at).map_err(io("move the snapshot to", at))?;
            Ok(size)
        });
        match result {
            Ok(size) => {
                tracing::info!(snapshot = ?at, size_kib = size / 1024, took_ms = started.elapsed().as_millis() as u64, "snapshot made");
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&building);
                Err(e)
            }
        }
    }

    /// The template: booted to agent ready with no pod device but the vsock, which is then
    /// ejected; the stopped machine is saved in the directory `out`. Returns the snapshot's
    /// size (state and the memory pages with data).
    async fn save_template(&self, spec: &VmSpec, out: &Path, dir: VmDir) -> Result<u64, SnapshotError> {
        if self.engine == Engine::Builtin {
            return self.save_builtin_template(spec, out, dir).await;
        }
        let template = VmSpec { share: None, nic: None, ..spec.clone() };
        std::fs::create_dir_all(dir.path()).map_err(io("create", dir.path()))?;
        super::jail::prepare_memory(&template, &dir).map_err(SnapshotError::Template)?;
        let vm = Vm::start(&self.engine(Mode::Template), &template, dir.clone()).await.map_err(SnapshotError::Template)?;
        let result = self.save(&vm, &template, &dir, out).await;
        vm.kill().await;
        crate::pod::share::umount_tree(dir.path());
        crate::pod::share::remove_tree(dir.path());
        result
    }

    /// The builtin template: booted with the pod's devices (the share on a backend of its own
    /// serving an empty directory, the NIC without a tap), saved by hull-vmm into its memory
    /// directory at agent ready, then stopped; the snapshot's files go to `out`. Returns the
    /// snapshot's size (state and the memory pages with data).
    async fn save_builtin_template(&self, spec: &VmSpec, out: &Path, dir: VmDir) -> Result<u64, SnapshotError> {
        let share_dir = dir.path().join("share");
        std::fs::create_dir_all(&share_dir).map_err(io("create", &share_dir))?;
        let template = VmSpec { share: spec.share.as_ref().map(|s| Share { tag: s.tag.clone(), dir: share_dir.clone() }), ..spec.clone() };
        let hypervisor = Builtin { vmm: self.vmm.clone(), mode: builtin::Mode::Template };
        let result = match super::jail::prepare_memory(&template, &dir) {
            Ok(_) => match Vm::start(&hypervisor, &template, dir.clone()).await {
                Ok(vm) => {
                    let saved = self.save_builtin(&vm, &template, &dir, out).await;
                    vm.kill().await;
                    saved
                }
                Err(e) => Err(SnapshotError::Template(e)),
            },
            Err(e) => Err(SnapshotError::Template(e)),
        };
        // Whatever happened: the template's memory tmpfs and directory go.
        crate::pod::share::umount_tree(dir.path());
        crate::pod::share::remove_tree(dir.path());
        result
    }

    async fn save_builtin(&self, vm: &Vm, spec: &VmSpec, dir: &VmDir, out: &Path) -> Result<u64, SnapshotError> {
        drop(vm.wait_for_agent(self.boot_timeout).await.map_err(SnapshotError::Template)?);
        let api = dir.run().join(API_SOCKET);
        vmm_request(&api, "pause").await?;
        let inside = Placement { spec, dir, vmm: &self.vmm }.memory_dir();
        vmm_request(&api, &format!("snapshot {}", inside.display())).await?;
        // The template's memory directory is its VMM's to write: its files are taken as files,
        // never through a link, and its state no larger than a VM's state is.
        let memory = dir.memory();
        let state_from = memory.join(BUILTIN_STATE);
        let state = read_regular(&state_from, BUILTIN_MAX_STATE)?;
        let state_to = out.join(BUILTIN_STATE);
        let mut f = std::fs::File::create(&state_to).map_err(io("create", &state_to))?;
        f.write_all(&state).and_then(|()| f.sync_all()).map_err(io("write", &state_to))?;
        let (from, to, size) = (memory.join(MEMORY), out.join(MEMORY), u64::from(spec.memory_mib) << 20);
        let kept = tokio::task::spawn_blocking(move || copy_pages(&from, &to, size, None).and_then(|n| std::fs::File::open(&to)?.sync_all().map(|()| n)))
            .await
            .map_err(|e| SnapshotError::Io { what: "save the template's memory in", path: out.into(), source: std::io::Error::other(e) })?
            .map_err(io("save the template's memory in", out))?;
        // The restored VMM, unprivileged in its jail, reads them through its bind of `out`
        // (the snapshot directory above stays root's alone: no one else reaches them).
        use std::os::unix::fs::PermissionsExt;
        for (path, mode) in [(out.to_path_buf(), 0o755), (state_to, 0o644), (out.join(MEMORY), 0o644)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io("open up", &path))?;
        }
        Ok(state.len() as u64 + kept)
    }

    async fn save(&self, vm: &Vm, spec: &VmSpec, dir: &VmDir, out: &Path) -> Result<u64, SnapshotError> {
        drop(vm.wait_for_agent(self.boot_timeout).await.map_err(SnapshotError::Template)?);
        let mut qmp = Qmp::connect(&dir.run().join(QMP_SOCKET), Duration::from_secs(10)).await?;
        qmp.execute("device_del", json!({ "id": "vsock" })).await?;
        qmp.event("DEVICE_DELETED", |d| d.get("device").and_then(|v| v.as_str()) == Some("vsock"), Duration::from_secs(30)).await?;
        let socket = dir.run().join(SAVE_SOCKET);
        let listener = bind_in(&dir.run(), SAVE_SOCKET).map_err(io("listen at", &socket))?;
        // QEMU runs as the jail's uid: the socket is made its own.
        Placement { spec, dir, vmm: &self.vmm }.hand_socket_to_jail(SAVE_SOCKET).map_err(SnapshotError::Template)?;
        qmp.execute("migrate-set-capabilities", ignore_shared()).await?;
        qmp.execute("stop", json!({})).await?;
        let uri = format!("unix:{}", Placement { spec, dir, vmm: &self.vmm }.socket(SAVE_SOCKET).display());
        qmp.execute("migrate", json!({ "uri": uri })).await?;
        let limit = Duration::from_secs(60);
        let (mut stream, _) = tokio::time::timeout(limit, listener.accept())
            .await
            .map_err(|_| SnapshotError::Timeout { what: "connect to save the snapshot", secs: limit.as_secs() })?
            .map_err(io("accept at", &socket))?;
        let state = out.join(STATE);
        let mut file = tokio::fs::File::create(&state).await.map_err(io("create", &state))?;
        let copied = tokio::io::copy(&mut (&mut stream).take(MAX_STATE + 1), &mut file).await.map_err(io("write", &state))?;
        if copied > MAX_STATE {
            return Err(SnapshotError::TooBig);
        }
        qmp.migration_completed(limit).await?;
        file.flush().await.map_err(io("write", &state))?;
        file.sync_all().await.map_err(io("write", &state))?;
        // The stopped template's RAM, as its file holds it.
        let (from, to, size) = (dir.memory().join(super::jail::RAM_FILE), out.join(MEMORY), u64::from(spec.memory_mib) << 20);
        let kept = tokio::task::spawn_blocking(move || copy_pages(&from, &to, size, None).and_then(|n| std::fs::File::open(&to)?.sync_all().map(|()| n)))
            .await
            .map_err(|e| SnapshotError::Io { what: "save the template's memory in", path: out.into(), source: std::io::Error::other(e) })?
            .map_err(io("save the template's memory in", out))?;
        Ok(copied + kept)
    }
}

/// The content of the regular file `path` (not a link), at most `limit` bytes.
fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Not blocking: a FIFO planted there would hold the open forever.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(io("open", path))?;
    if !file.metadata().map_err(io("read", path))?.is_file() {
        return Err(SnapshotError::NotAFile { what: "state", path: path.into() });
    }
    let mut data = Vec::new();
    file.take(limit + 1).read_to_end(&mut data).map_err(io("read", path))?;
    if data.len() as u64 > limit {
        return Err(SnapshotError::TooBig);
    }
    Ok(data)
}

/// One request on hull-vmm's control socket (a line each way; hull-vmm's `api`), answered
/// within 60 s (a snapshot writes the guest's memory).
async fn vmm_request(socket: &Path, request: &str) -> Result<String, SnapshotError> {
    use tokio::io::AsyncBufReadExt;
    let limit = Duration::from_secs(60);
    let exchange = async {
        // Through its descriptor: a pod's socket directory is longer than a socket address
        // takes, and the directory is the VMM's to write (no link is followed).
        let mut stream = crate::agent::client::connect_socket_file(socket).await?;
        stream.write_all(format!("{request}\n").as_bytes()).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream).take(4096).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line.trim().to_string())
    };
    let reply = tokio::time::timeout(limit, exchange).await.map_err(|_| SnapshotError::VmmTimeout { request: request.into(), secs: limit.as_secs() })?.map_err(io("talk to hull-vmm at", socket))?;
    if !reply.starts_with("ok") {
        return Err(SnapshotError::VmmRefused { request: request.into(), reply });
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made() -> Made {
        Made {
            format: FORMAT,
            engine: "qemu-tcg".into(),
            kernel_sha256: "k".into(),
            root: "image".into(),
            root_sha256: "i".into(),
            vmm: "/usr/bin/qemu-system-x86_64 1 bytes, modified 1.0".into(),
            vcpus: 1,
            memory_mib: 256,
            cmdline_extra: vec![],
        }
    }

    /// Another kernel, root, QEMU or kernel parameters name a directory of their own in
    /// the same family, and the log line says which changed.
    #[test]
    fn what_made_a_snapshot_names_it_and_says_what_changed() {
        let a = made();
        assert_eq!(a.dir_name(), made().dir_name(), "the name is a function of what made it");
        assert!(a.dir_name().starts_with("qemu-tcg-1c-256m-"), "{}", a.dir_name());
        let b = Made { kernel_sha256: "k2".into(), cmdline_extra: vec!["quiet".into()], ..made() };
        assert_ne!(a.dir_name(), b.dir_name());
        assert_eq!(a.family(), b.family());
        assert_eq!(b.changed_from(&a), ["kernel", "kernel_params"]);
        let c = Made { memory_mib: 512, ..made() };
        assert_ne!(a.family(), c.family(), "another size is another family, kept beside");
    }

    /// Only the pages with data are copied, to the same offsets; the rest stays holes.
    #[test]
    fn a_copy_of_guest_memory_holds_its_data_pages_only() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("ram"), dir.path().join("copy"));
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 * PAGE as u64).unwrap();
        // A data page, a written page of zeros, a page whose last byte alone is set, and a
        // run of three pages across the copy buffer's page grid.
        f.write_all_at(&[7u8; PAGE], 2 * PAGE as u64).unwrap();
        f.write_all_at(&[0u8; PAGE], 5 * PAGE as u64).unwrap();
        f.write_all_at(&[1u8], 9 * PAGE as u64 - 1).unwrap();
        f.write_all_at(&[9u8; 3 * PAGE], 40 * PAGE as u64).unwrap();
        drop(f);
        let written = copy_pages(&src, &dst, 64 * PAGE as u64, None).unwrap();
        assert_eq!(written, 5 * PAGE as u64, "pages 2, 8, 40-42");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap(), "the copy reads as the original");
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 64 * PAGE as u64);
        assert!(meta.blocks() * 512 <= 5 * PAGE as u64 + PAGE as u64, "only the data pages are allocated: {} bytes", meta.blocks() * 512);
        // A link planted where the RAM file was is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        assert!(copy_pages(&link, &dir.path().join("copy2"), 64 * PAGE as u64, None).is_err(), "a symlink is refused");
    }

    /// A snapshot is hashed from the files' content, not their names; a digest is remembered
    /// until the file changes, and a forged one is not believed.
    #[test]
    fn a_file_is_known_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let digests = dir.path().join("digests");
        let (x, y) = (dir.path().join("x"), dir.path().join("y"));
        std::fs::write(&x, b"kernel").unwrap();
        std::fs::write(&y, b"kernel").unwrap();
        let kernel = format!("{:x}", Sha256::digest(b"kernel"));
        assert_eq!(sha256_of(&x, &digests).unwrap(), kernel);
        assert_eq!(sha256_of(&y, &digests).unwrap(), kernel);
        assert_eq!(std::fs::read_dir(&digests).unwrap().count(), 2, "each file's digest is remembered");
        // Rewritten in place, same size: the change time moves, the old digest is not used.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&y, b"kernal").unwrap();
        assert_eq!(sha256_of(&y, &digests).unwrap(), format!("{:x}", Sha256::digest(b"kernal")));
        // A new snapshot keeps only its own files' digests.
        forget_digests_but(&digests, &[&kernel]);
        let kept: Vec<String> = std::fs::read_dir(&digests).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect();
        assert_eq!(kept, vec![kernel.clone(), kernel.clone()], "x's digest and y's first, both of \"kernel\"");
        // A remembered digest that is not one is hashed again.
        for entry in std::fs::read_dir(&digests).unwrap() {
            std::fs::write(entry.unwrap().path(), b"not a digest").unwrap();
        }
        assert_eq!(sha256_of(&x, &digests).unwrap(), kernel);
        assert!(matches!(sha256_of(&dir.path().join("none"), &digests), Err(SnapshotError::Io { what: "read", .. })));
    }
}
