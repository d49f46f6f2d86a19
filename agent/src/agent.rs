//! The agent's state: the sandbox, its containers, and the operations the API exposes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hull_proto::agent::{Interface, Route, StdioRequest, Storage};
use tokio::sync::{mpsc, Notify};

use crate::cgroups::{self, CgroupError};
use crate::container::{bundle_config, valid_id, Container, ContainerError, Status};
use crate::launcher::{helper_args, LaunchError, Launcher};
use crate::process::{Exit, Process};
use crate::reaper::Reaper;
use crate::sandbox::{Sandbox, SandboxError};
use crate::spec::{self, SpecError};
use crate::storage::{self, StorageError};

/// How often a running container's OOM counter is read.
const OOM_POLL: Duration = Duration::from_millis(100);
/// Numbers the terminal sockets of execs (see exec).
static NEXT_CONSOLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("The id {0:?} is not a valid container or exec id (letters, digits, '_', '.', '-'; at most 128).")]
    InvalidId(String),
    #[error("There is no container {0}.")]
    UnknownContainer(String),
    #[error("Container {0} already exists.")]
    DuplicateContainer(String),
    #[error("Cannot write the bundle of container {id}: {source}.")]
    Bundle { id: String, source: std::io::Error },
    #[error("The resources for container {id} are malformed: {source}.")]
    BadResources { id: String, source: serde_json::Error },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

pub struct AgentConfig {
    /// Bundles and libcontainer state live here.
    pub state_dir: PathBuf,
    /// The agent runs as the guest's init (PID 1).
    pub init_mode: bool,
    /// The agent's own executable, re-executed as helper.
    pub exe: PathBuf,
}

pub struct Agent {
    pub cfg: AgentConfig,
    reaper: Reaper,
    sandbox: Mutex<Option<Sandbox>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom_tx: mpsc::Sender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
    /// Notified when DestroySandbox has finished: the agent exits (or powers the VM off).
    pub shutdown: Notify,
}

fn check_id(id: &str) -> Result<(), AgentError> {
    if valid_id(id) { Ok(()) } else { Err(AgentError::InvalidId(id.into())) }
}

impl Agent {
    pub fn new(cfg: AgentConfig, reaper: Reaper) -> Arc<Agent> {
        let (oom_tx, oom_rx) = mpsc::channel(256);
        Arc::new(Agent {
            cfg,
            reaper,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            shutdown: Notify::new(),
        })
    }

    fn libcontainer_root(&self) -> PathBuf {
        self.cfg.state_dir.join("containers")
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::UnknownContainer(id.into()))
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, AgentError> {
        Ok(self.container(id)?.process(exec_id)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create_sandbox(&self, id: &str, hostname: &str, dns: &[String], interfaces: &[Interface], routes: &[Route], sysctls: &[(String, String)], host_clock_ns: u64, entropy: &[u8]) -> Result<(), AgentError> {
        check_id(id)?;
        if let Some(existing) = self.sandbox_id() {
            return Err(SandboxError::Exists(existing).into());
        }
        // The guest's clock and RNG are the VM's, set before any process of the pod starts
        // (identity.rs); outside a VM the agent leaves its host's alone.
        if self.cfg.init_mode {
            crate::identity::apply(host_clock_ns, entropy)?;
        } else if entropy.len() > crate::identity::MAX_ENTROPY {
            return Err(crate::identity::IdentityError::TooMuchEntropy(entropy.len()).into());
        }
        // The whole network request is checked before anything is created.
        crate::network::validate(interfaces, routes)?;
        if !self.cfg.init_mode && !interfaces.is_empty() {
            return Err(crate::network::NetworkError::NotInit.into());
        }
        let sandbox = Sandbox::create(
            id,
            hostname,
            dns,
            sysctls,
            &self.cfg.exe,
            &self.cfg.state_dir,
            self.cfg.init_mode,
            &self.reaper,
        )
        .await?;
        // Two concurrent CreateSandbox calls: the first to get here wins.
        let lost_to = {
            let mut slot = self.sandbox.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(existing) => Some((existing.id.clone(), sandbox)),
                None => {
                    *slot = Some(sandbox);
                    None
                }
            }
        };
        if let Some((existing, sandbox)) = lost_to {
            sandbox.destroy(&self.reaper).await;
            return Err(SandboxError::Exists(existing).into());
        }
        // In the VM the sandbox's network namespace is the VM's own: the pod's interface and
        // routes go there (and loopback comes up).
        if self.cfg.init_mode {
            if let Err(e) = crate::network::apply(interfaces, routes).await {
                let sandbox = self.sandbox.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(sandbox) = sandbox {
                    sandbox.destroy(&self.reaper).await;
                }
                return Err(e.into());
            }
        }
        let vsock_cid = if self.cfg.init_mode { crate::identity::vsock_cid() } else { None };
        tracing::info!(sandbox_id = id, hostname, interfaces = interfaces.len(), vsock_cid, "sandbox created");
        Ok(())
    }

    /// The sandbox id for log lines ("-" outside a sandbox).
    fn sandbox_label(&self) -> String {
        self.sandbox_id().unwrap_or_else(|| "-".into())
    }

    pub fn sandbox_id(&self) -> Option<String> {
        self.sandbox.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| s.id.clone())
    }

    /// Stops and removes every container, then the sandbox, then asks the agent to exit.
    ///
    /// As the guest's init it syncs the guest's filesystems before it returns: the reply tells
    /// the host that nothing of the pod is left to write, and the host ends the VM on it
    /// instead of waiting for the guest to power off.
    pub async fn destroy_sandbox(&self, grace: Duration) -> Result<(), AgentError> {
        let ids: Vec<String> = self.containers.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let mut first_err = None;
        for id in ids {
            if let Err(e) = self.remove_container(&id, grace).await {
                tracing::error!(container_id = %id, error = %e, "cannot remove container during sandbox teardown");
                first_err.get_or_insert(e);
            }
        }
        let sandbox = self.sandbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sandbox) = sandbox {
            sandbox.destroy(&self.reaper).await;
            tracing::info!(sandbox_id = %sandbox.id, "sandbox destroyed");
        }
        if self.cfg.init_mode {
            let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        }
        self.shutdown.notify_one();
        first_err.map_or(Ok(()), Err)
    }

    pub async fn create_container(
        self: &Arc<Self>,
        id: &str,
        spec_json: &str,
        rootfs: &str,
        stdio: &StdioRequest,
        storages: &[Storage],
        sandbox_pid: bool,
    ) -> Result<i32, AgentError> {
        check_id(id)?;
        if self.containers.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id) {
            return Err(AgentError::DuplicateContainer(id.into()));
        }
        let mut mounted = storage::mount_all(storages)?;
        let result = self.create_on_storage(id, spec_json, rootfs, stdio, sandbox_pid).await;
        match result {
            Ok(container) => {
                container.set_storages(mounted);
                Ok(container.init.pid)
            }
            Err(e) => {
                mounted.unmount_all();
                Err(e)
            }
        }
    }

    async fn create_on_storage(
        self: &Arc<Self>,
        id: &str,
        spec_json: &str,
        rootfs: &str,
        stdio: &StdioRequest,
        sandbox_pid: bool,
    ) -> Result<Arc<Container>, AgentError> {
        let (sandbox_ns, cgroup_path) = {
            let sb = self.sandbox.lock().unwrap_or_else(|e| e.into_inner());
            match sb.as_ref() {
                Some(s) => (Some(s.namespaces.clone()), PathBuf::from(format!("/hull/{}/{id}", s.id))),
                None => (None, PathBuf::from(format!("/hull/{id}"))),
            }
        };
        let spec = spec::prepare_container_spec(id, spec_json, rootfs, &cgroup_path, sandbox_ns.as_ref(), sandbox_pid)?;
        let terminal = spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);

        let bundle = self.cfg.state_dir.join("bundles").join(id);
        let state_dir = self.libcontainer_root().join(id);
        let bundle_err = |source| AgentError::Bundle { id: id.into(), source };
        if bundle.exists() || state_dir.exists() {
            // Left by a crashed agent or a failed create; nothing runs from it any more.
            let _ = std::fs::remove_dir_all(&bundle);
            let _ = std::fs::remove_dir_all(&state_dir);
        }
        std::fs::create_dir_all(&bundle).map_err(bundle_err)?;
        std::fs::create_dir_all(self.libcontainer_root()).map_err(bundle_err)?;
        let write = serde_json::to_vec(&spec).map_err(|e| bundle_err(std::io::Error::other(e)));
        let result = match write.and_then(|json| std::fs::write(bundle_config(&bundle), json).map_err(bundle_err)) {
            Ok(()) => {
                let console = terminal.then(|| bundle.join("console.sock"));
                let root = self.libcontainer_root();
                let args = helper_args(
                    &["helper", "create", "--id", id],
                    &[("--root", &root), ("--bundle", &bundle)],
                );
                let args = with_console(args, console.as_deref());
                let launcher = Launcher { reaper: &self.reaper, exe: &self.cfg.exe, what: format!("create container {id}") };
                launcher.launch(args, stdio, console.as_deref()).await.map_err(AgentError::from)
            }
            Err(e) => Err(e),
        };
        let launched = match result {
            Ok(l) => l,
            Err(e) => {
                // Leave nothing: libcontainer may have made its state dir and cgroup.
                if state_dir.exists() {
                    if let Ok(mut lc) = libcontainer::container::Container::load(state_dir.clone()) {
                        let _ = lc.delete(true);
                    }
                    let _ = std::fs::remove_dir_all(&state_dir);
                }
                let _ = std::fs::remove_dir_all(&bundle);
                tracing::warn!(sandbox_id = %self.sandbox_label(), container_id = id, error = %e, "container create failed");
                return Err(e);
            }
        };
        let init = Arc::new(Process::new(id, "", launched.pid, launched.stdio));
        let container = Arc::new(Container::new(id, state_dir, bundle, cgroup_path, init.clone()));
        self.containers.lock().unwrap_or_else(|e| e.into_inner()).insert(id.into(), container.clone());
        self.watch_exit(&container, init.clone());
        self.watch_oom(&container);
        tracing::info!(sandbox_id = %self.sandbox_label(), container_id = id, pid = launched.pid, terminal, "container created");
        Ok(container)
    }

    /// Records the exit of a container process; the init's exit stops the container.
    fn watch_exit(self: &Arc<Self>, container: &Arc<Container>, process: Arc<Process>) {
        let exited = self.reaper.watch(process.pid);
        let container = Arc::downgrade(container);
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let status = exited.await.unwrap_or(137);
            let mut oom_killed = false;
            if let Some(c) = container.upgrade() {
                if c.check_oom() {
                    if let Some(a) = agent.upgrade() {
                        a.publish_oom(&c.id);
                    }
                }
                oom_killed = status == 137 && c.oom_kills_seen() > 0;
                if process.exec_id.is_empty() {
                    c.set_status(Status::Stopped);
                }
            }
            process.set_exit(Exit { status, oom_killed });
            tracing::info!(
                container_id = %process.container_id,
                exec_id = %process.exec_id,
                pid = process.pid,
                exit_status = status,
                oom_killed,
                "process exited"
            );
        });
    }

    fn watch_oom(self: &Arc<Self>, container: &Arc<Container>) {
        let container = Arc::downgrade(container);
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let (Some(c), Some(a)) = (container.upgrade(), agent.upgrade()) else { return };
                if c.status() == Status::Stopped {
                    return;
                }
                if c.check_oom() {
                    a.publish_oom(&c.id);
                }
            }
        });
    }

    fn publish_oom(&self, id: &str) {
        tracing::warn!(sandbox_id = %self.sandbox_label(), container_id = id, "OOM kill in container");
        if self.oom_tx.try_send(id.to_string()).is_err() {
            tracing::warn!(container_id = id, "OOM event queue is full; event dropped");
        }
    }

    pub async fn next_oom_event(&self) -> Option<String> {
        self.oom_rx.lock().await.recv().await
    }

    pub fn start_container(&self, id: &str) -> Result<(), AgentError> {
        self.container(id)?.start()?;
        tracing::info!(sandbox_id = %self.sandbox_label(), container_id = id, "container started");
        Ok(())
    }

    pub async fn remove_container(&self, id: &str, grace: Duration) -> Result<(), AgentError> {
        let container = self.container(id)?;
        container.destroy(grace).await?;
        self.containers.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        tracing::info!(sandbox_id = %self.sandbox_label(), container_id = id, "container removed");
        Ok(())
    }

    pub async fn exec_process(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        process_json: &str,
        stdio: &StdioRequest,
    ) -> Result<i32, AgentError> {
        check_id(exec_id)?;
        let container = self.container(id)?;
        let process_path = container.prepare_exec(exec_id)?;
        let what = format!("exec {exec_id} in container {id}");
        let process = spec::prepare_exec_process(&what, process_json)?;
        let terminal = process.terminal().unwrap_or(false);
        let json = serde_json::to_vec(&process).map_err(|e| AgentError::Bundle { id: id.into(), source: std::io::Error::other(e) })?;
        std::fs::write(&process_path, json).map_err(|source| AgentError::Bundle { id: id.into(), source })?;
        // Named by a counter, not the exec id: a CRI exec id is 64 characters, the bundle path
        // holds the container's 64 already, and a socket path has 108 bytes.
        let console = terminal.then(|| container.bundle.join(format!("console-{}.sock", NEXT_CONSOLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed))));
        let root = self.libcontainer_root();
        let args = helper_args(&["helper", "exec", "--id", id], &[("--root", &root), ("--process", &process_path)]);
        let args = with_console(args, console.as_deref());
        let launcher = Launcher { reaper: &self.reaper, exe: &self.cfg.exe, what };
        let result = launcher.launch(args, stdio, console.as_deref()).await;
        let _ = std::fs::remove_file(&process_path);
        let launched = result?;
        let process = Arc::new(Process::new(id, exec_id, launched.pid, launched.stdio));
        container.add_exec(process.clone());
        self.watch_exit(&container, process);
        tracing::info!(sandbox_id = %self.sandbox_label(), container_id = id, exec_id, pid = launched.pid, terminal, "exec started");
        Ok(launched.pid)
    }

    pub fn update_container(&self, id: &str, resources_json: &str) -> Result<(), AgentError> {
        let container = self.container(id)?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_str(resources_json)
            .map_err(|source| AgentError::BadResources { id: id.into(), source })?;
        cgroups::update(&container.cgroup_path, id, &resources)?;
        tracing::info!(sandbox_id = %self.sandbox_label(), container_id = id, "container resources updated");
        Ok(())
    }
}

fn with_console(mut args: Vec<std::ffi::OsString>, console: Option<&std::path::Path>) -> Vec<std::ffi::OsString> {
    if let Some(c) = console {
        args.push("--console-socket".into());
        args.push(c.as_os_str().to_owned());
    }
    args
}
