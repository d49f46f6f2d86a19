//! containerd's task API: thin handlers over the pod's `Containers`, whose kind decides what
//! happens in the guest (see `container.rs`), and the `Pod` the shim serves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use tokio::sync::{Notify, OnceCell};

use super::container::{Container, ContainerError, Containers, Exit, Kind, Process};
use super::events::{publish_exit, watch_pod, watch_process, Events};
use super::io::StdioPaths;
use crate::config::{Config, ConfigError};
use crate::pod::share::cleanup_container;
use crate::pod::spec;
use crate::pod::state::PodDir;
use crate::pod::{Pod, PodSpec};

type TtrpcResult<T> = ttrpc::Result<T>;

/// How long a pod's guest gets to power off after DestroySandbox before it is killed: the
/// agent stops every container within its 1 s grace first.
const POWER_OFF: std::time::Duration = std::time::Duration::from_secs(10);

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> ttrpc::Error {
        status(e.code(), e.to_string())
    }
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, format!("{what} is not supported by hull"))
}

fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths { stdin: stdin.into(), stdout: stdout.into(), stderr: stderr.into(), terminal }
}

pub struct TaskService {
    namespace: String,
    config: Result<Config, ConfigError>,
    events: Events,
    exit: Arc<Notify>,
    pod: OnceCell<Arc<Pod>>,
    containers: Containers,
    /// This shim's socket, and whether it was already removed because the pod ended.
    socket: PathBuf,
    retired: Arc<AtomicBool>,
}

impl TaskService {
    pub fn new(namespace: String, config: Result<Config, ConfigError>, events: Events, exit: Arc<Notify>, socket: PathBuf, retired: Arc<AtomicBool>) -> TaskService {
        TaskService { namespace, config, events, exit, pod: OnceCell::new(), containers: Containers::default(), socket, retired }
    }

    /// Ends the pod's VM. The socket goes first: a container created from now on with this
    /// pod's id (`ctr run --rm X` twice in a row) starts a new shim instead of joining this
    /// one, whose pod is gone.
    ///
    /// The destroy runs as a task of its own: a request that ends first (containerd gives
    /// Delete 10 s, as long as the guest gets to power off) would otherwise drop it halfway,
    /// between asking the guest to power off and killing what is left, and leave the VM running.
    async fn retire(&self, pod: &Arc<Pod>) {
        if !self.retired.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.socket);
        }
        let pod = pod.clone();
        let _ = tokio::spawn(async move { pod.destroy(POWER_OFF).await }).await;
    }

    fn pod(&self) -> TtrpcResult<Arc<Pod>> {
        self.pod.get().cloned().ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod VM is not running"))
    }

    fn vmm_pid(&self) -> u32 {
        self.pod.get().map(|p| p.vmm_pid).unwrap_or(0)
    }

    /// The pod this shim serves, booted by its first container.
    async fn ensure_pod(&self, pod_id: &str, spec: &serde_json::Value, options: &MessageField<Any>) -> TtrpcResult<Arc<Pod>> {
        let pod = self
            .pod
            .get_or_try_init(|| async {
                let config = match options.as_ref().and_then(crate::config::config_path_from_any) {
                    Some(path) => Config::load(Some(&path)).map_err(|e| e.to_string()),
                    None => self.config.as_ref().cloned().map_err(ToString::to_string),
                }
                .map_err(|e| status(Code::FAILED_PRECONDITION, e))?;
                let mut config = config;
                (config.vcpus, config.memory_mib) = spec::vm_size(spec, config.vcpus, config.memory_mib).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
                let hostname = spec.get("hostname").and_then(|h| h.as_str()).unwrap_or(pod_id);
                let netns = crate::pod::network::netns_path(spec);
                let pod = Pod::boot(&config, PodDir::new(&self.namespace, pod_id), PodSpec { id: pod_id, hostname, netns: netns.as_deref(), share: None, sysctls: spec::sysctls(spec), cgroups_path: spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str()).filter(|p| !p.is_empty()) })
                    .await
                    .map(Arc::new)
                    .map_err(|e| status(Code::UNAVAILABLE, format!("pod {pod_id}: {e}")))?;
                watch_pod(pod.clone(), self.containers.clone(), self.events.clone());
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

    async fn create_container(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let id = req.id.clone();
        if self.containers.contains(&id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container {id} already exists")));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = super::read_bundle_spec(&bundle).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let pod_id = super::pod_id(&spec, &id).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        if !spec::has_own_network(&spec) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("container {id} asks for the host's network namespace (host networking); a pod in a microVM cannot share it"),
            ));
        }
        if !spec::has_own_ipc(&spec) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("container {id} asks for the host's IPC namespace (hostIPC); a pod in a microVM cannot share it"),
            ));
        }
        let kind = Kind::of(&spec);
        let paths = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let pod = self.ensure_pod(&pod_id, &spec, &req.options).await?;
        let mut init = Process::new(&id, "", paths.clone());
        match kind.create(&pod, &id, &bundle, spec, &req.rootfs, &paths).await {
            Ok(io) => init.io = io,
            Err(e) => {
                cleanup_container(&pod.dir, &id, Some(&bundle));
                if self.containers.is_empty() && pod.id == id {
                    // ctr run's container is its own pod: nothing else holds the VM.
                    self.retire(&pod).await;
                }
                return Err(e.into());
            }
        }
        self.containers.insert(id, Container { bundle, kind, init, execs: HashMap::new() });
        Ok(pod.vmm_pid)
    }
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
        self.events.send(topics::TASK_CREATE_EVENT_TOPIC, e).await;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pod = self.pod()?;
        let pid = pod.vmm_pid;
        let (kind, exec_spec, paths) = self.containers.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => &c.execs[e], None => &c.init };
            if p.started || p.exited().is_some() {
                return Err(status(Code::FAILED_PRECONDITION, format!("process {} of container {} was already started", req.exec_id, req.id)));
            }
            Ok((c.kind, p.exec_spec.clone(), p.paths.clone()))
        })??;
        let (io, runs) = if req.exec_id.is_empty() {
            let runs = kind.start(&pod, &req.id).await?;
            (self.containers.process(&req.id, "", |p| p.io.clone())?, runs)
        } else {
            let process = exec_spec.unwrap_or_default();
            pod.conn.exec(&req.id, &req.exec_id, &process, paths.request()).await.map_err(ContainerError::from)?;
            let io = super::io::connect(&pod.conn, &req.id, &req.exec_id, &paths).await.map_err(ContainerError::from)?;
            (Some(Arc::new(io)), true)
        };
        self.containers.process(&req.id, &req.exec_id, |p| {
            p.started = true;
            p.io = io.clone();
        })?;
        if runs {
            watch_process(pod.clone(), self.containers.clone(), self.events.clone(), req.id.clone(), req.exec_id.clone(), io);
        }
        tracing::info!(sandbox_id = %pod.id, container_id = %req.id, exec_id = %req.exec_id, "process started");
        if req.exec_id.is_empty() {
            self.events.send(topics::TASK_START_EVENT_TOPIC, ev::TaskStart { container_id: req.id.clone(), pid, ..Default::default() }).await;
        } else {
            let e = ev::TaskExecStarted { container_id: req.id.clone(), exec_id: req.exec_id.clone(), pid, ..Default::default() };
            self.events.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, e).await;
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let pid = self.vmm_pid();
        Ok(self.containers.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => &c.execs[e], None => &c.init };
            let exit = p.exited();
            api::StateResponse {
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
            }
        })?)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.containers.process(&req.id, &req.exec_id, |p| p.exit.subscribe())?;
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
        let (kind, exited, started) = self.containers.with_process(&req.id, &req.exec_id, |c, e| {
            let p = match e { Some(e) => &c.execs[e], None => &c.init };
            (c.kind, p.exited().is_some(), p.started)
        })?;
        if exited {
            return Err(status(Code::NOT_FOUND, format!("process {} of container {} has already finished", req.exec_id, req.id)));
        }
        tracing::info!(container_id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        if !req.exec_id.is_empty() && !started {
            return Err(status(Code::FAILED_PRECONDITION, format!("exec {} of container {} has not started", req.exec_id, req.id)));
        }
        if kind == Kind::Sandbox {
            // Nothing runs in the guest for the pod sandbox: the signal ends it.
            let exit = Exit::now(128 + req.signal);
            if self.containers.record_exit(&req.id, "", exit) {
                publish_exit(&self.events, &req.id, "", self.vmm_pid(), exit).await;
            }
            return Ok(api::Empty::new());
        }
        match self.pod()?.conn.signal(&req.id, &req.exec_id, req.signal as i32, req.all).await {
            Ok(()) => Ok(api::Empty::new()),
            // It ended on its own meanwhile.
            Err(e) if e.code() == Some(Code::NOT_FOUND) || e.code() == Some(Code::FAILED_PRECONDITION) => Ok(api::Empty::new()),
            Err(e) => Err(ContainerError::from(e).into()),
        }
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let pid = self.vmm_pid();
        let response = |exit: Exit| api::DeleteResponse { pid, exit_status: exit.code, exited_at: MessageField::some(exit.timestamp()), ..Default::default() };
        if !req.exec_id.is_empty() {
            let exit = self.containers.with_process(&req.id, &req.exec_id, |c, e| {
                let e = e.expect("an exec id");
                let p = &c.execs[e];
                if p.started && p.exited().is_none() {
                    return Err(status(Code::FAILED_PRECONDITION, format!("exec {e} of container {} is still running", req.id)));
                }
                let exit = p.exited();
                c.execs.remove(e);
                Ok(exit)
            })??;
            return Ok(response(exit.unwrap_or_else(|| Exit::now(0))));
        }
        let (kind, bundle, exit, running) =
            self.containers.with_process(&req.id, "", |c, _| (c.kind, c.bundle.clone(), c.init.exited(), c.init.started && c.init.exited().is_none()))?;
        if running {
            return Err(status(Code::FAILED_PRECONDITION, format!("container {} is still running; kill it first", req.id)));
        }
        let pod = self.pod()?;
        kind.remove(&pod, &req.id, &bundle).await?;
        let remaining = self.containers.remove(&req.id);
        // The pod's own container (CRI's pause container, or ctr run's only one) takes the VM
        // with it; so does the last container.
        if pod.id == req.id || remaining == 0 {
            self.retire(&pod).await;
        }
        let exit = exit.unwrap_or_else(|| Exit::now(0));
        tracing::info!(sandbox_id = %pod.id, container_id = %req.id, exit_status = exit.code, "container deleted");
        let e = ev::TaskDelete { container_id: req.id.clone(), id: req.id.clone(), pid, exit_status: exit.code, exited_at: MessageField::some(exit.timestamp()), ..Default::default() };
        self.events.send(topics::TASK_DELETE_EVENT_TOPIC, e).await;
        Ok(response(exit))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let process: serde_json::Value = req
            .spec
            .as_ref()
            .map(|any| serde_json::from_slice(&any.value))
            .transpose()
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("the process of exec {} is not valid JSON: {e}", req.exec_id)))?
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("exec {} has no process", req.exec_id)))?;
        let paths = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        self.containers.with_process(&req.id, "", |c, _| {
            if c.kind == Kind::Sandbox {
                return Err(ContainerError::Sandbox { id: req.id.clone() }.into());
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(Code::ALREADY_EXISTS, format!("exec {} already exists in container {}", req.exec_id, req.id)));
            }
            let mut p = Process::new(&req.id, &req.exec_id, paths);
            p.exec_spec = Some(process);
            c.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })??;
        let e = ev::TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() };
        self.events.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, e).await;
        Ok(api::Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let kind = self.containers.kind(&req.id)?;
        let pids = kind.pids(&*self.pod()?, &req.id).await?;
        let processes = pids.into_iter().map(|pid| api::ProcessInfo { pid, ..Default::default() }).collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, true).await?;
        self.events.send(topics::TASK_PAUSED_EVENT_TOPIC, ev::TaskPaused { container_id: req.id.clone(), ..Default::default() }).await;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, false).await?;
        self.events.send(topics::TASK_RESUMED_EVENT_TOPIC, ev::TaskResumed { container_id: req.id.clone(), ..Default::default() }).await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("checkpointing a task"))
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        self.containers.process(&req.id, &req.exec_id, |_| ())?;
        self.pod()?.conn.resize_tty(&req.id, &req.exec_id, req.height, req.width).await.map_err(ContainerError::from)?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let io = self.containers.process(&req.id, &req.exec_id, |p| p.io.clone())?;
        if req.stdin {
            if let Some(io) = io {
                io.close_stdin();
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let kind = self.containers.kind(&req.id)?;
        let resources = req.resources.as_ref().map(|a| String::from_utf8_lossy(&a.value).into_owned()).unwrap_or_default();
        kind.update(&*self.pod()?, &req.id, resources).await?;
        Ok(api::Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let kind = self.containers.kind(&req.id)?;
        let metrics = kind.metrics(&*self.pod()?, &req.id).await?;
        let any = super::events::to_any(super::container::METRICS_PACKAGE, &metrics).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        self.containers.kind(&req.id)?;
        Ok(api::ConnectResponse { shim_pid: std::process::id(), task_pid: self.vmm_pid(), version: "2".into(), ..Default::default() })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.containers.is_empty() {
            if let Some(pod) = self.pod.get() {
                if pod.exited().is_none() {
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
        let kind = self.containers.kind(id)?;
        kind.freeze(&*self.pod()?, id, pause).await?;
        self.containers.process(id, "", |p| p.paused = pause)?;
        Ok(())
    }
}
