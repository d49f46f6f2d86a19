//! The shim's view of a pod's containers: what kind each is (the pod's sandbox, or a workload
//! whose processes run in the guest), its init process and execs, their stdio relays and exit
//! statuses. What a container does in the guest is decided here, by its kind, once; the task
//! handlers do not branch on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics as m2;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::Code;
use tokio::sync::watch;

use super::io::{ProcessIo, StdioPaths};
use crate::agent::ClientError;
use crate::pod::share::{cleanup_container, container_dir, guest_paths, share_rootfs, share_storage, ShareError};
use crate::pod::spec::{self, SpecError};
use crate::pod::Pod;

/// The protobuf package of the cgroup v2 metrics a Stats reply holds (`cgroups/v2/metrics.proto`).
pub const METRICS_PACKAGE: &str = "io.containerd.cgroups.v2";

/// The annotation CRI puts on a pod's containers: `sandbox` for the pause container.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("Container {id} does not exist in this pod.")]
    NoContainer { id: String },
    #[error("Exec {exec_id} does not exist in container {id}.")]
    NoExec { id: String, exec_id: String },
    #[error("Container {id} is the pod sandbox; nothing runs in it.")]
    Sandbox { id: String },
    #[error("Cannot mount the rootfs of container {id} ({fstype} {source_path}): {source}.")]
    Rootfs { id: String, fstype: String, source_path: String, #[source] source: containerd_shim::Error },
    #[error("Container {id} has no rootfs: {path:?} does not exist.")]
    NoRootfs { id: String, path: PathBuf },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error(transparent)]
    Io(#[from] super::io::IoError),
}

impl ContainerError {
    /// The ttrpc code containerd gets: an agent error keeps its own (NOT_FOUND stays
    /// NOT_FOUND).
    pub fn code(&self) -> Code {
        match self {
            ContainerError::NoContainer { .. } | ContainerError::NoExec { .. } => Code::NOT_FOUND,
            ContainerError::Sandbox { .. } => Code::FAILED_PRECONDITION,
            ContainerError::NoRootfs { .. } | ContainerError::Spec(_) => Code::INVALID_ARGUMENT,
            ContainerError::Agent(e) => e.code().unwrap_or(Code::INTERNAL),
            ContainerError::Rootfs { .. } | ContainerError::Share(_) | ContainerError::Io(_) => Code::INTERNAL,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub code: u32,
    pub at: (i64, i32),
}

impl Exit {
    pub fn now(code: u32) -> Exit {
        let t = Timestamp::now();
        Exit { code, at: (t.seconds, t.nanos) }
    }

    pub fn timestamp(&self) -> Timestamp {
        Timestamp { seconds: self.at.0, nanos: self.at.1, ..Default::default() }
    }
}

pub struct Process {
    pub id: String,
    pub exec_id: String,
    pub paths: StdioPaths,
    /// An exec's OCI process (JSON), until it starts.
    pub exec_spec: Option<serde_json::Value>,
    pub started: bool,
    pub paused: bool,
    pub exit: watch::Sender<Option<Exit>>,
    pub io: Option<Arc<ProcessIo>>,
}

impl Process {
    pub fn new(id: &str, exec_id: &str, paths: StdioPaths) -> Process {
        Process { id: id.into(), exec_id: exec_id.into(), paths, exec_spec: None, started: false, paused: false, exit: watch::channel(None).0, io: None }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub fn status(&self) -> api::Status {
        match (self.exited(), self.started, self.paused) {
            (Some(_), _, _) => api::Status::STOPPED,
            (None, true, true) => api::Status::PAUSED,
            (None, true, false) => api::Status::RUNNING,
            (None, false, _) => api::Status::CREATED,
        }
    }
}

/// What a container is in a VM pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// CRI's pause container: the VM is the sandbox, so nothing runs for it in the guest; its
    /// "process" lives until it is signalled.
    Sandbox,
    /// A container whose processes run in the guest, through the agent.
    Workload,
}

impl Kind {
    pub fn of(spec: &serde_json::Value) -> Kind {
        match super::annotation(spec, CONTAINER_TYPE_ANNOTATION) {
            Some("sandbox") => Kind::Sandbox,
            _ => Kind::Workload,
        }
    }

    /// Creates the container in the guest: its rootfs mounted and shared, its spec rewritten
    /// for the guest, its stdio connected. Returns the init process's relays.
    pub async fn create(self, pod: &Arc<Pod>, id: &str, bundle: &Path, spec: serde_json::Value, rootfs_mounts: &[api::Mount], paths: &StdioPaths) -> Result<Option<Arc<ProcessIo>>, ContainerError> {
        if self == Kind::Sandbox {
            return Ok(None);
        }
        let rootfs = bundle.join("rootfs");
        for m in rootfs_mounts {
            let _ = std::fs::create_dir_all(&rootfs);
            let fstype = Some(m.type_.as_str()).filter(|s| !s.is_empty());
            let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
            containerd_shim::mount::mount_rootfs(fstype, source, &m.options, &rootfs).map_err(|e| ContainerError::Rootfs {
                id: id.into(),
                fstype: m.type_.clone(),
                source_path: m.source.clone(),
                source: e,
            })?;
        }
        if !rootfs.is_dir() {
            return Err(ContainerError::NoRootfs { id: id.into(), path: rootfs });
        }
        // The guest mounts the share root at GUEST_SHARE/<id>; <share>/<id> is this
        // container's directory there (rootfs, shared host files).
        share_rootfs(&pod.dir, id, &rootfs)?;
        let pod_pid = spec::shares_pod_pid(&spec);
        let guest_spec = spec::for_guest(id, spec, &container_dir(&pod.dir, id)?)?;
        let (mount_point, _) = guest_paths(id);
        pod.conn.create_in_pod(id, &guest_spec, paths.request(), vec![share_storage(&mount_point)], pod_pid).await?;
        match super::io::connect(&pod.conn, id, "", paths).await {
            Ok(io) => Ok(Some(Arc::new(io))),
            Err(e) => {
                let _ = pod.conn.remove(id).await;
                Err(e.into())
            }
        }
    }

    /// Starts the init process in the guest; says whether something now runs to be waited for.
    pub async fn start(self, pod: &Pod, id: &str) -> Result<bool, ContainerError> {
        match self {
            Kind::Sandbox => Ok(false),
            Kind::Workload => Ok(pod.conn.start(id).await.map(|()| true)?),
        }
    }

    /// Removes the container from the guest (a VM that is gone has nothing to remove) and
    /// undoes its host mounts.
    pub async fn remove(self, pod: &Pod, id: &str, bundle: &Path) -> Result<(), ContainerError> {
        if self == Kind::Sandbox {
            return Ok(());
        }
        if let Err(e) = pod.conn.remove(id).await {
            if pod.exited().is_none() && e.code() != Some(Code::NOT_FOUND) {
                return Err(e.into());
            }
        }
        cleanup_container(&pod.dir, id, Some(bundle));
        Ok(())
    }

    /// The container's processes as containerd lists them: guest pids, or the VMM's for the
    /// sandbox.
    pub async fn pids(self, pod: &Pod, id: &str) -> Result<Vec<u32>, ContainerError> {
        match self {
            Kind::Sandbox => Ok(vec![pod.vmm_pid]),
            Kind::Workload => Ok(pod.conn.list_processes(id).await?.into_iter().map(|p| p as u32).collect()),
        }
    }

    pub async fn freeze(self, pod: &Pod, id: &str, pause: bool) -> Result<(), ContainerError> {
        match self {
            Kind::Sandbox => Ok(()),
            Kind::Workload => Ok(pod.conn.freeze(id, pause).await?),
        }
    }

    /// New resources (the OCI `LinuxResources` JSON containerd sends).
    pub async fn update(self, pod: &Pod, id: &str, resources_json: String) -> Result<(), ContainerError> {
        match self {
            Kind::Sandbox => Ok(()),
            Kind::Workload => Ok(pod.conn.update(id, resources_json).await?),
        }
    }

    /// cgroup v2 metrics of the container in the guest (none for the sandbox).
    pub async fn metrics(self, pod: &Pod, id: &str) -> Result<m2::Metrics, ContainerError> {
        let mut metrics = m2::Metrics::new();
        if self == Kind::Workload {
            let s = pod.conn.stats(id).await?;
            metrics.cpu = MessageField::some(m2::CPUStat { usage_usec: s.cpu_usage_ns / 1000, user_usec: s.cpu_user_ns / 1000, system_usec: s.cpu_system_ns / 1000, ..Default::default() });
            metrics.memory = MessageField::some(m2::MemoryStat { usage: s.memory_usage_bytes, usage_limit: s.memory_limit_bytes, max_usage: s.memory_max_usage_bytes, ..Default::default() });
            metrics.pids = MessageField::some(m2::PidsStat { current: s.pids_current, limit: s.pids_limit, ..Default::default() });
            metrics.memory_events = MessageField::some(m2::MemoryEvents { oom_kill: s.oom_kills, ..Default::default() });
        }
        Ok(metrics)
    }
}

pub struct Container {
    pub bundle: PathBuf,
    pub kind: Kind,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    /// The init process (`exec_id` empty) or an exec; the caller checked it exists.
    fn process(&mut self, exec_id: Option<&str>) -> &mut Process {
        match exec_id {
            Some(e) => self.execs.get_mut(e).expect("checked by Containers::with_process"),
            None => &mut self.init,
        }
    }
}

/// The pod's containers, shared by the task handlers and the tasks that watch processes.
#[derive(Clone, Default)]
pub struct Containers(Arc<Mutex<HashMap<String, Container>>>);

impl Containers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn insert(&self, id: String, container: Container) {
        self.lock().insert(id, container);
    }

    /// Removes a container; returns how many are left.
    pub fn remove(&self, id: &str) -> usize {
        let mut cs = self.lock();
        cs.remove(id);
        cs.len()
    }

    /// Runs `f` on the container and the process (`exec_id` empty: the init process), or
    /// names what is missing.
    pub fn with_process<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&mut Container, Option<&str>) -> T) -> Result<T, ContainerError> {
        let mut containers = self.lock();
        let c = containers.get_mut(id).ok_or_else(|| ContainerError::NoContainer { id: id.into() })?;
        if !exec_id.is_empty() && !c.execs.contains_key(exec_id) {
            return Err(ContainerError::NoExec { id: id.into(), exec_id: exec_id.into() });
        }
        Ok(f(c, (!exec_id.is_empty()).then_some(exec_id)))
    }

    /// Runs `f` on one process.
    pub fn process<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&mut Process) -> T) -> Result<T, ContainerError> {
        self.with_process(id, exec_id, |c, e| f(c.process(e)))
    }

    pub fn kind(&self, id: &str) -> Result<Kind, ContainerError> {
        self.with_process(id, "", |c, _| c.kind)
    }

    /// Records a process's exit unless it has one already; says whether it was recorded.
    pub fn record_exit(&self, id: &str, exec_id: &str, exit: Exit) -> bool {
        self.process(id, exec_id, |p| {
            if p.exited().is_some() {
                return false;
            }
            p.exit.send_replace(Some(exit));
            true
        })
        .unwrap_or(false)
    }

    /// Every process that has not exited ends with `code` (the VM died); returns them.
    pub fn exit_all(&self, code: u32) -> Vec<(String, String, Exit)> {
        let mut exits = Vec::new();
        for c in self.lock().values_mut() {
            for p in std::iter::once(&mut c.init).chain(c.execs.values_mut()) {
                if p.exited().is_none() {
                    let exit = Exit::now(code);
                    p.exit.send_replace(Some(exit));
                    exits.push((p.id.clone(), p.exec_id.clone(), exit));
                }
            }
        }
        exits
    }
}
