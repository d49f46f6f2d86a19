//! The task service: containerd's view of the pod's containers and processes, carried out by
//! the agent in the pod's VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics as m2;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use tokio::sync::{mpsc, watch, Notify, OnceCell};

use super::io::{ProcessIo, StdioPaths};
use super::pod::PodVm;
use super::spec;
use crate::agent_client::ClientError;
use crate::config::{Config, ConfigError};

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An agent error keeps its code (NOT_FOUND stays NOT_FOUND for containerd).
fn agent_err(e: ClientError) -> ttrpc::Error {
    let code = e.code().unwrap_or(Code::INTERNAL);
    status(code, e.to_string())
}

/// Events to containerd, sent in order by one task.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<(&'static str, Box<dyn MessageDyn>)>>,
}

impl Events {
    pub async fn start(ttrpc_address: &str, namespace: &str) -> Events {
        if ttrpc_address.is_empty() {
            tracing::warn!("TTRPC_ADDRESS is not set: events are not published");
            return Events { tx: None };
        }
        let publisher = match containerd_shim::publisher::RemotePublisher::new(ttrpc_address).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, address = ttrpc_address, "cannot connect the event publisher");
                return Events { tx: None };
            }
        };
        let (tx, mut rx) = mpsc::channel::<(&'static str, Box<dyn MessageDyn>)>(256);
        let ns = namespace.to_string();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                if let Err(e) = publisher.publish(containerd_shim::Context::default(), topic, &ns, event).await {
                    tracing::warn!(topic, error = %e, "cannot publish an event");
                }
            }
        });
        Events { tx: Some(tx) }
    }

    async fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((topic, event)).await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Exit {
    code: u32,
    at: (i64, i32),
}

impl Exit {
    fn now(code: u32) -> Exit {
        let t = Timestamp::now();
        Exit { code, at: (t.seconds, t.nanos) }
    }

    fn timestamp(&self) -> Timestamp {
        Timestamp { seconds: self.at.0, nanos: self.at.1, ..Default::default() }
    }
}

struct Process {
    id: String,
    exec_id: String,
    paths: StdioPaths,
    /// An exec's OCI process (JSON), until it starts.
    exec_spec: Option<serde_json::Value>,
    started: bool,
    paused: bool,
    exit: watch::Sender<Option<Exit>>,
    io: Option<Arc<ProcessIo>>,
}

impl Process {
    fn new(id: &str, exec_id: &str, paths: StdioPaths) -> Process {
        Process { id: id.into(), exec_id: exec_id.into(), paths, exec_spec: None, started: false, paused: false, exit: watch::channel(None).0, io: None }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn status(&self) -> api::Status {
        match (self.exited(), self.started, self.paused) {
            (Some(_), _, _) => api::Status::STOPPED,
            (None, true, true) => api::Status::PAUSED,
            (None, true, false) => api::Status::RUNNING,
            (None, false, _) => api::Status::CREATED,
        }
    }
}

struct Container {
    bundle: PathBuf,
    /// CRI's pause container: the VM is the sandbox, no process runs for it.
    is_pause: bool,
    init: Process,
    execs: HashMap<String, Process>,
}

pub struct TaskService {
    namespace: String,
    config: Result<Config, ConfigError>,
    events: Events,
    exit: Arc<Notify>,
    pod: OnceCell<Arc<PodVm>>,
    containers: Arc<Mutex<HashMap<String, Container>>>,
    /// This shim's socket, and whether it was already removed because the pod ended.
    socket: PathBuf,
    retired: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TaskService {
    pub fn new(namespace: String, config: Result<Config, ConfigError>, events: Events, exit: Arc<Notify>, socket: PathBuf, retired: Arc<AtomicBool>) -> TaskService {
        TaskService { namespace, config, events, exit, pod: OnceCell::new(), containers: Arc::new(Mutex::new(HashMap::new())), socket, retired }
    }

    /// Ends the pod's VM. The socket goes first: a container created from now on with this
    /// pod's id (`ctr run --rm X` twice in a row) starts a new shim instead of joining this
    /// one, whose pod is gone.
    async fn retire(&self, pod: &PodVm) {
        if !self.retired.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.socket);
        }
        pod.destroy().await;
    }

    fn pod(&self) -> TtrpcResult<Arc<PodVm>> {
        self.pod.get().cloned().ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod VM is not running"))
    }

    fn vmm_pid(&self) -> u32 {
        self.pod.get().map(|p| p.vmm_pid).unwrap_or(0)
    }

    /// Runs `f` on the process, or NOT_FOUND naming what is missing.
    fn with_process<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&mut Container, Option<&str>) -> TtrpcResult<T>) -> TtrpcResult<T> {
        let mut containers = lock(&self.containers);
        let c = containers.get_mut(id).ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} does not exist in this pod")))?;
        if !exec_id.is_empty() && !c.execs.contains_key(exec_id) {
            return Err(status(Code::NOT_FOUND, format!("exec {exec_id} does not exist in container {id}")));
        }
        f(c, (!exec_id.is_empty()).then_some(exec_id))
    }

    fn exit_rx(&self, id: &str, exec_id: &str) -> TtrpcResult<watch::Receiver<Option<Exit>>> {
        self.with_process(id, exec_id, |c, e| Ok(match e {
            Some(e) => c.execs[e].exit.subscribe(),
            None => c.init.exit.subscribe(),
        }))
    }

    async fn ensure_pod(&self, pod_id: &str, spec: &serde_json::Value, options: &MessageField<containerd_shim_protos::protobuf::well_known_types::any::Any>) -> TtrpcResult<Arc<PodVm>> {
        let pod = self
            .pod
            .get_or_try_init(|| async {
                let config = match options.as_ref().and_then(spec::config_path_from_any) {
                    Some(path) => Config::load(Some(Path::new(&path))).map_err(|e| e.to_string()),
                    None => self.config.as_ref().cloned().map_err(ToString::to_string),
                }
                .map_err(|e| status(Code::FAILED_PRECONDITION, e))?;
                let mut config = config;
                (config.vcpus, config.memory_mib) = spec::vm_size(spec, config.vcpus, config.memory_mib);
                let hostname = spec.get("hostname").and_then(|h| h.as_str()).unwrap_or(pod_id);
                let dir = super::pod_dir(&self.namespace, pod_id);
                let netns = crate::network::netns_path(spec);
                let pod = PodVm::boot(&config, dir, pod_id, hostname, netns.as_deref())
                    .await
                    .map(Arc::new)
                    .map_err(|e| status(Code::UNAVAILABLE, format!("pod {pod_id}: {e}")))?;
                // Once per VM: its death and its OOM kills reach containerd.
                self.watch_vm(pod.clone());
                Ok::<_, ttrpc::Error>(pod)
            })
            .await?
            .clone();
        if self.retired.load(Ordering::SeqCst) {
            return Err(status(Code::FAILED_PRECONDITION, format!("pod {} has ended and its shim is exiting; create the container again", pod.id)));
        }
        if pod.id != pod_id {
            return Err(status(Code::FAILED_PRECONDITION, format!("this shim serves pod {}, not {pod_id}", pod.id)));
        }
        Ok(pod)
    }

    /// When the VM dies, every process still running exits with 255 (and containerd hears).
    fn watch_vm(&self, pod: Arc<PodVm>) {
        let containers = self.containers.clone();
        let events = self.events.clone();
        let oom_pod = pod.clone();
        tokio::spawn(async move {
            let why = loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Some(why) = pod.exited().await {
                    break why;
                }
            };
            let mut exits = Vec::new();
            for c in lock(&containers).values_mut() {
                for p in std::iter::once(&mut c.init).chain(c.execs.values_mut()) {
                    if p.exited().is_none() {
                        let exit = Exit::now(255);
                        p.exit.send_replace(Some(exit));
                        exits.push((p.id.clone(), p.exec_id.clone(), exit));
                    }
                }
            }
            tracing::error!(sandbox_id = %pod.id, status = %why, processes = exits.len(), "the pod VM exited");
            for (id, exec_id, exit) in exits {
                publish_exit(&events, &id, &exec_id, pod.vmm_pid, exit).await;
            }
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            let pod = oom_pod;
            loop {
                let r = pod.conn.client.get_oom_event(crate::agent_client::ctx_unbounded(), &hull_proto::agent::GetOOMEventRequest::new()).await;
                match r {
                    Ok(e) => {
                        tracing::info!(sandbox_id = %pod.id, container_id = %e.container_id, "OOM kill");
                        events.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev::TaskOOM { container_id: e.container_id, ..Default::default() })).await;
                    }
                    Err(_) => {
                        if pod.exited().await.is_some() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }

    /// Waits for a started process in the guest; records and publishes its exit once its
    /// output is delivered.
    fn spawn_waiter(&self, pod: Arc<PodVm>, id: String, exec_id: String, io: Option<Arc<ProcessIo>>) {
        let containers = self.containers.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let code = match pod.conn.wait(&id, &exec_id).await {
                Ok(r) => r.exit_status as u32,
                Err(e) => {
                    tracing::warn!(sandbox_id = %pod.id, container_id = %id, exec_id = %exec_id, error = %e, "wait failed");
                    255
                }
            };
            if let Some(io) = io {
                io.drain(Duration::from_secs(5)).await;
            }
            let exit = Exit::now(code);
            let recorded = {
                let mut cs = lock(&containers);
                let p = cs.get_mut(&id).and_then(|c| if exec_id.is_empty() { Some(&mut c.init) } else { c.execs.get_mut(&exec_id) });
                match p {
                    Some(p) if p.exited().is_none() => {
                        p.exit.send_replace(Some(exit));
                        true
                    }
                    _ => false,
                }
            };
            if recorded {
                tracing::info!(sandbox_id = %pod.id, container_id = %id, exec_id = %exec_id, exit_status = code, "process exited");
                publish_exit(&events, &id, &exec_id, pod.vmm_pid, exit).await;
            }
        });
    }

    async fn create_container(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let id = req.id.clone();
        if lock(&self.containers).contains_key(&id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container {id} already exists")));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = super::read_bundle_spec(&bundle).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let pod_id = super::pod_id(&spec, &id);
        if !spec::has_own_network(&spec) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("container {id} asks for the host's network namespace (host networking); a pod in a microVM cannot share it"),
            ));
        }
        let is_pause = super::annotation(&spec, super::CONTAINER_TYPE_ANNOTATION) == Some("sandbox");
        let paths = StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal };
        let pod = self.ensure_pod(&pod_id, &spec, &req.options).await?;
        let mut init = Process::new(&id, "", paths.clone());
        if !is_pause {
            match self.create_in_guest(&pod, &id, &bundle, spec, req, &paths).await {
                Ok(io) => init.io = Some(io),
                Err(e) => {
                    super::pod::cleanup_container(&pod.dir, &bundle, &id);
                    if lock(&self.containers).is_empty() && pod.id == id {
                        // ctr run's container is its own pod: nothing else holds the VM.
                        self.retire(&pod).await;
                    }
                    return Err(e);
                }
            }
        }
        lock(&self.containers).insert(id.clone(), Container { bundle, is_pause, init, execs: HashMap::new() });
        Ok(pod.vmm_pid)
    }

    async fn create_in_guest(&self, pod: &Arc<PodVm>, id: &str, bundle: &Path, spec: serde_json::Value, req: &api::CreateTaskRequest, paths: &StdioPaths) -> TtrpcResult<Arc<ProcessIo>> {
        let rootfs = bundle.join("rootfs");
        for m in &req.rootfs {
            let _ = std::fs::create_dir_all(&rootfs);
            let fstype = Some(m.type_.as_str()).filter(|s| !s.is_empty());
            let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
            containerd_shim::mount::mount_rootfs(fstype, source, &m.options, &rootfs)
                .map_err(|e| status(Code::INTERNAL, format!("cannot mount the rootfs of container {id} ({} {}): {e}", m.type_, m.source)))?;
        }
        if !rootfs.is_dir() {
            return Err(status(Code::INVALID_ARGUMENT, format!("container {id} has no rootfs: {rootfs:?} does not exist")));
        }
        // The guest mounts the share root at GUEST_SHARE/<id>; <share>/<id> is this
        // container's directory there (rootfs, shared host files).
        let host_share = pod.shared.join(id);
        let target = host_share.join("rootfs");
        std::fs::create_dir_all(&target).map_err(|e| status(Code::INTERNAL, format!("cannot create {target:?}: {e}")))?;
        nix::mount::mount(Some(&rootfs), &target, None::<&str>, nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC, None::<&str>)
            .map_err(|e| status(Code::INTERNAL, format!("cannot share the rootfs of container {id}: {e}")))?;
        let guest_spec = spec::for_guest(id, spec, &host_share).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let (mount_point, _) = spec::guest_paths(id);
        let share = crate::vm::qemu::share_storage(&mount_point);
        pod.conn.create_on(id, &guest_spec, paths.request(), vec![share]).await.map_err(agent_err)?;
        match super::io::connect(&pod.conn, id, "", paths).await {
            Ok(io) => Ok(Arc::new(io)),
            Err(e) => {
                let _ = pod.conn.remove(id).await;
                Err(status(Code::INTERNAL, e.to_string()))
            }
        }
    }
}

async fn publish_exit(events: &Events, id: &str, exec_id: &str, pid: u32, exit: Exit) {
    let e = ev::TaskExit {
        container_id: id.into(),
        // containerd's CRI finds the container by `id`: the container id for the init process.
        id: if exec_id.is_empty() { id.into() } else { exec_id.into() },
        pid,
        exit_status: exit.code,
        exited_at: MessageField::some(exit.timestamp()),
        ..Default::default()
    };
    events.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, format!("{what} is not supported by hull"))
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("restoring from a checkpoint"));
        }
        let pid = self.create_container(&req).await.inspect_err(|e| {
            tracing::error!(container_id = %req.id, error = %e, "create failed");
        })?;
        tracing::info!(container_id = %req.id, bundle = %req.bundle, pid, "container created");
        let io = ev::TaskIO { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal, ..Default::default() };
        let e = ev::TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(io),
            pid,
            ..Default::default()
        };
        self.events.send(topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)).await;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pod = self.pod()?;
        let pid = pod.vmm_pid;
        let (is_pause, exec_spec, paths) = self.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => c.execs.get(e).expect("checked"), None => &c.init };
            if p.started || p.exited().is_some() {
                return Err(status(Code::FAILED_PRECONDITION, format!("process {} of container {} was already started", req.exec_id, req.id)));
            }
            Ok((c.is_pause, p.exec_spec.clone(), p.paths.clone()))
        })?;
        let io = if req.exec_id.is_empty() {
            if !is_pause {
                pod.conn.start(&req.id).await.map_err(agent_err)?;
            }
            self.with_process(&req.id, "", |c, _| Ok(c.init.io.clone()))?
        } else {
            let process = exec_spec.unwrap_or_default();
            pod.conn.exec(&req.id, &req.exec_id, &process, paths.request()).await.map_err(agent_err)?;
            let io = super::io::connect(&pod.conn, &req.id, &req.exec_id, &paths).await.map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            Some(Arc::new(io))
        };
        self.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => c.execs.get_mut(e).expect("checked"), None => &mut c.init };
            p.started = true;
            p.io = io.clone();
            Ok(())
        })?;
        if !is_pause || !req.exec_id.is_empty() {
            self.spawn_waiter(pod.clone(), req.id.clone(), req.exec_id.clone(), io);
        }
        tracing::info!(sandbox_id = %pod.id, container_id = %req.id, exec_id = %req.exec_id, "process started");
        if req.exec_id.is_empty() {
            self.events.send(topics::TASK_START_EVENT_TOPIC, Box::new(ev::TaskStart { container_id: req.id.clone(), pid, ..Default::default() })).await;
        } else {
            let e = ev::TaskExecStarted { container_id: req.id.clone(), exec_id: req.exec_id.clone(), pid, ..Default::default() };
            self.events.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)).await;
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let pid = self.vmm_pid();
        self.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => &c.execs[e], None => &c.init };
            let exit = p.exited();
            Ok(api::StateResponse {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                bundle: c.bundle.to_string_lossy().into_owned(),
                pid,
                status: p.status().into(),
                stdin: p.paths.stdin.clone(),
                stdout: p.paths.stdout.clone(),
                stderr: p.paths.stderr.clone(),
                terminal: p.paths.terminal,
                exit_status: exit.map(|e| e.code).unwrap_or(0),
                exited_at: exit.map(|e| e.timestamp()).into(),
                ..Default::default()
            })
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.exit_rx(&req.id, &req.exec_id)?;
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(status(Code::NOT_FOUND, format!("container {} was deleted while waited for", req.id)));
            }
        };
        Ok(api::WaitResponse { exit_status: exit.code, exited_at: MessageField::some(exit.timestamp()), ..Default::default() })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let pid = self.vmm_pid();
        let (is_pause, exited, started) = self.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => &c.execs[e], None => &c.init };
            Ok((c.is_pause, p.exited().is_some(), p.started))
        })?;
        if exited {
            return Err(status(Code::NOT_FOUND, format!("process {} of container {} has already finished", req.exec_id, req.id)));
        }
        tracing::info!(container_id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        if !req.exec_id.is_empty() && !started {
            return Err(status(Code::FAILED_PRECONDITION, format!("exec {} of container {} has not started", req.exec_id, req.id)));
        }
        if is_pause {
            // Nothing runs in the guest for the pod sandbox: the signal ends it.
            let exit = Exit::now(128 + req.signal);
            self.with_process(&req.id, "", |c, _| {
                c.init.exit.send_replace(Some(exit));
                Ok(())
            })?;
            publish_exit(&self.events, &req.id, "", pid, exit).await;
            return Ok(api::Empty::new());
        }
        let pod = self.pod()?;
        match pod.conn.signal(&req.id, &req.exec_id, req.signal as i32, req.all).await {
            Ok(()) => Ok(api::Empty::new()),
            // It ended on its own meanwhile.
            Err(e) if e.code() == Some(Code::NOT_FOUND) || e.code() == Some(Code::FAILED_PRECONDITION) => Ok(api::Empty::new()),
            Err(e) => Err(agent_err(e)),
        }
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let pid = self.vmm_pid();
        if !req.exec_id.is_empty() {
            let exit = self.with_process(&req.id, &req.exec_id, |c, e| {
                let e = e.expect("exec");
                let p = &c.execs[e];
                if p.started && p.exited().is_none() {
                    return Err(status(Code::FAILED_PRECONDITION, format!("exec {e} of container {} is still running", req.id)));
                }
                let exit = p.exited();
                c.execs.remove(e);
                Ok(exit)
            })?;
            let exit = exit.unwrap_or_else(|| Exit::now(0));
            return Ok(api::DeleteResponse { pid, exit_status: exit.code, exited_at: MessageField::some(exit.timestamp()), ..Default::default() });
        }
        let (is_pause, bundle, exit, running) = self.with_process(&req.id, "", |c, _| {
            Ok((c.is_pause, c.bundle.clone(), c.init.exited(), c.init.started && c.init.exited().is_none()))
        })?;
        if running {
            return Err(status(Code::FAILED_PRECONDITION, format!("container {} is still running; kill it first", req.id)));
        }
        let pod = self.pod()?;
        if !is_pause {
            if let Err(e) = pod.conn.remove(&req.id).await {
                if pod.exited().await.is_none() && e.code() != Some(Code::NOT_FOUND) {
                    return Err(agent_err(e));
                }
            }
            super::pod::cleanup_container(&pod.dir, &bundle, &req.id);
        }
        let remaining = {
            let mut cs = lock(&self.containers);
            cs.remove(&req.id);
            cs.len()
        };
        // The pod's own container (CRI's pause container, or ctr run's only one) takes the VM
        // with it; so does the last container.
        if pod.id == req.id || remaining == 0 {
            self.retire(&pod).await;
        }
        let exit = exit.unwrap_or_else(|| Exit::now(0));
        tracing::info!(sandbox_id = %pod.id, container_id = %req.id, exit_status = exit.code, "container deleted");
        let e = ev::TaskDelete { container_id: req.id.clone(), id: req.id.clone(), pid, exit_status: exit.code, exited_at: MessageField::some(exit.timestamp()), ..Default::default() };
        self.events.send(topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)).await;
        Ok(api::DeleteResponse { pid, exit_status: exit.code, exited_at: MessageField::some(exit.timestamp()), ..Default::default() })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let process: serde_json::Value = req
            .spec
            .as_ref()
            .map(|any| serde_json::from_slice(&any.value))
            .transpose()
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("the process of exec {} is not valid JSON: {e}", req.exec_id)))?
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("exec {} has no process", req.exec_id)))?;
        let paths = StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal };
        self.with_process(&req.id, "", |c, _| {
            if c.is_pause {
                return Err(status(Code::FAILED_PRECONDITION, format!("container {} is the pod sandbox; nothing runs in it", req.id)));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(Code::ALREADY_EXISTS, format!("exec {} already exists in container {}", req.exec_id, req.id)));
            }
            let mut p = Process::new(&req.id, &req.exec_id, paths);
            p.exec_spec = Some(process);
            c.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })?;
        let e = ev::TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() };
        self.events.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)).await;
        Ok(api::Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let is_pause = self.with_process(&req.id, "", |c, _| Ok(c.is_pause))?;
        let pod = self.pod()?;
        let processes = if is_pause {
            vec![api::ProcessInfo { pid: pod.vmm_pid, ..Default::default() }]
        } else {
            let mut r = hull_proto::agent::ListProcessesRequest::new();
            r.container_id = req.id.clone();
            let list = pod.conn.client.list_processes(crate::agent_client::ctx(), &r).await.map_err(|e| agent_err(ClientError::rpc("ListProcesses", e)))?;
            list.processes.iter().map(|p| api::ProcessInfo { pid: p.pid as u32, ..Default::default() }).collect()
        };
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, true).await?;
        self.events.send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev::TaskPaused { container_id: req.id.clone(), ..Default::default() })).await;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, false).await?;
        self.events.send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev::TaskResumed { container_id: req.id.clone(), ..Default::default() })).await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("checkpointing a task"))
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        self.with_process(&req.id, &req.exec_id, |_, _| Ok(()))?;
        let mut r = hull_proto::agent::TtyWinResizeRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.rows = req.height;
        r.cols = req.width;
        self.pod()?.conn.client.tty_win_resize(crate::agent_client::ctx(), &r).await.map_err(|e| agent_err(ClientError::rpc("TtyWinResize", e)))?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let io = self.with_process(&req.id, &req.exec_id, |c, e| Ok(match e { Some(e) => c.execs[e].io.clone(), None => c.init.io.clone() }))?;
        if req.stdin {
            if let Some(io) = io {
                io.close_stdin();
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let is_pause = self.with_process(&req.id, "", |c, _| Ok(c.is_pause))?;
        if is_pause {
            return Ok(api::Empty::new());
        }
        let resources = req.resources.as_ref().map(|a| String::from_utf8_lossy(&a.value).into_owned()).unwrap_or_default();
        let mut r = hull_proto::agent::UpdateContainerRequest::new();
        r.container_id = req.id.clone();
        r.resources_json = resources;
        self.pod()?.conn.client.update_container(crate::agent_client::ctx(), &r).await.map_err(|e| agent_err(ClientError::rpc("UpdateContainer", e)))?;
        Ok(api::Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let is_pause = self.with_process(&req.id, "", |c, _| Ok(c.is_pause))?;
        let mut metrics = m2::Metrics::new();
        if !is_pause {
            let mut r = hull_proto::agent::StatsContainerRequest::new();
            r.container_id = req.id.clone();
            let s = self.pod()?.conn.client.stats_container(crate::agent_client::ctx(), &r).await.map_err(|e| agent_err(ClientError::rpc("StatsContainer", e)))?;
            metrics.cpu = MessageField::some(m2::CPUStat { usage_usec: s.cpu_usage_ns / 1000, user_usec: s.cpu_user_ns / 1000, system_usec: s.cpu_system_ns / 1000, ..Default::default() });
            metrics.memory = MessageField::some(m2::MemoryStat { usage: s.memory_usage_bytes, usage_limit: s.memory_limit_bytes, max_usage: s.memory_max_usage_bytes, ..Default::default() });
            metrics.pids = MessageField::some(m2::PidsStat { current: s.pids_current, limit: s.pids_limit, ..Default::default() });
            metrics.memory_events = MessageField::some(m2::MemoryEvents { oom_kill: s.oom_kills, ..Default::default() });
        }
        let any = containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        self.with_process(&req.id, "", |_, _| Ok(()))?;
        Ok(api::ConnectResponse { shim_pid: std::process::id(), task_pid: self.vmm_pid(), version: "2".into(), ..Default::default() })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if lock(&self.containers).is_empty() {
            if let Some(pod) = self.pod.get() {
                if pod.exited().await.is_none() {
                    self.retire(pod).await;
                }
            }
            tracing::info!("no containers left: shim shutting down");
            self.exit.notify_one();
        }
        Ok(api::Empty::new())
    }
}

impl TaskService {
    async fn freeze(&self, id: &str, pause: bool) -> TtrpcResult<()> {
        let is_pause = self.with_process(id, "", |c, _| Ok(c.is_pause))?;
        if !is_pause {
            let conn = self.pod()?.conn.clone();
            let r = if pause {
                let mut r = hull_proto::agent::PauseContainerRequest::new();
                r.container_id = id.into();
                conn.client.pause_container(crate::agent_client::ctx(), &r).await.map_err(|e| ClientError::rpc("PauseContainer", e))
            } else {
                let mut r = hull_proto::agent::ResumeContainerRequest::new();
                r.container_id = id.into();
                conn.client.resume_container(crate::agent_client::ctx(), &r).await.map_err(|e| ClientError::rpc("ResumeContainer", e))
            };
            r.map_err(agent_err)?;
        }
        self.with_process(id, "", |c, _| {
            c.init.paused = pause;
            Ok(())
        })
    }
}
