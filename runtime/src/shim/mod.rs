//! containerd-shim-hull-v2: the shim v2 containerd runs for `runtime_type =
//! "io.containerd.hull.v2"`. One shim process serves one pod; the pod is one microVM.
//!
//! Why hull writes its own start/serve frame instead of `containerd_shim::run`: the 0.12 crate
//! speaks only task API v3 and answers `start` in containerd 2's JSON form, while Debian's
//! containerd 1.6 calls `containerd.task.v2.Task` and reads a bare address. The messages of v2
//! and v3 are identical, so the same service is registered under both names, and `start`
//! prints the address. (0.11 would speak v2 but needs ttrpc 0.9; the agent client is on 0.10.)

pub mod io;
pub mod pod;
pub mod service;
pub mod spec;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use containerd_shim::Flags;
use containerd_shim_protos::protobuf::Message;

pub const RUNTIME_ID: &str = "io.containerd.hull.v2";
/// Per-pod state: the VM's work directory, the virtio-fs share, the pids `delete` cleans up.
pub const STATE_ROOT: &str = "/run/hull/shim";
/// The CRI annotations that group containers into a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("Cannot parse the shim's arguments: {0}.")]
    Args(String),
    #[error("Unknown shim action {0:?} (expected start, delete, or none to serve).")]
    Action(String),
    #[error("Cannot read the bundle's OCI spec {path:?}: {reason}.")]
    Spec { path: PathBuf, reason: String },
    #[error("Cannot start the shim daemon: {0}.")]
    Spawn(#[source] std::io::Error),
    #[error("The shim daemon exited before serving on {address}: {status}.")]
    DaemonDied { address: String, status: String },
    #[error("Cannot serve the task API on {address}: {reason}.")]
    Serve { address: String, reason: String },
    #[error("Cannot write {path:?}: {source}.")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("Cannot start the async runtime: {0}.")]
    Runtime(#[source] std::io::Error),
}

/// The shim binary's entry point.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => return fail(ShimError::Args(e.to_string())),
    };
    if flags.version {
        println!("{RUNTIME_ID} containerd-shim-hull-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" => serve(flags),
        other => Err(ShimError::Action(other.into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: ShimError) -> ExitCode {
    // containerd logs a failed start's combined output; delete's stderr as warnings.
    eprintln!("containerd-shim-hull-v2: {e}");
    ExitCode::FAILURE
}

/// The bundle's OCI spec as JSON (the bundle is the working directory containerd gives us).
pub fn read_bundle_spec(bundle: &Path) -> Result<serde_json::Value, ShimError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ShimError::Spec { path: path.clone(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ShimError::Spec { path, reason: e.to_string() })
}

pub fn annotation<'a>(spec: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?.get(key)?.as_str()
}

/// Which pod a container belongs to: the CRI sandbox id, else (ctr run) the container itself.
pub fn pod_id(spec: &serde_json::Value, id: &str) -> String {
    annotation(spec, SANDBOX_ID_ANNOTATION).filter(|s| !s.is_empty()).unwrap_or(id).to_string()
}

pub fn pod_dir(namespace: &str, pod: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(namespace).join(pod)
}

/// `start`: find or spawn the pod's shim daemon and print its address.
fn start(flags: &Flags) -> Result<(), ShimError> {
    let bundle = std::env::current_dir().map_err(ShimError::Spawn)?;
    let spec = read_bundle_spec(&bundle)?;
    let pod = pod_id(&spec, &flags.id);
    // containerd writes the runtime options (an Any) to stdin; ConfigPath travels on to the
    // daemon as HULL_CONFIG.
    let mut options = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut options);
    let config_path = spec::config_path_from_options(&options);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &pod);
    let socket = address.trim_start_matches("unix://").to_string();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // The pod's shim already runs: this container joins it.
        return write_address(&bundle, &address);
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(dir) = Path::new(&socket).parent() {
        std::fs::create_dir_all(dir).map_err(|source| ShimError::Write { path: dir.into(), source })?;
    }
    let exe = std::env::current_exe().map_err(ShimError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id, "-address", &flags.address])
        .args(["-publish-binary", &flags.publish_binary, "-socket", &address])
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: the daemon outlives a containerd restart.
        .process_group(0);
    if flags.debug {
        cmd.arg("-debug");
    }
    if let Some(p) = config_path {
        cmd.env(crate::config::ENV_PATH, p);
    }
    let mut child = cmd.spawn().map_err(ShimError::Spawn)?;
    // The daemon closes its stdout once it serves (or when it dies).
    let mut out = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut out);
    }
    if let Ok(Some(status)) = child.try_wait() {
        return Err(ShimError::DaemonDied { address, status: status.to_string() });
    }
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let status = child.try_wait().ok().flatten().map(|s| s.to_string()).unwrap_or_else(|| "not serving".into());
        return Err(ShimError::DaemonDied { address, status });
    }
    write_address(&bundle, &address)
}

fn write_address(bundle: &Path, address: &str) -> Result<(), ShimError> {
    let path = bundle.join("address");
    std::fs::write(&path, address).map_err(|source| ShimError::Write { path, source })?;
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(address.as_bytes());
    let _ = stdout.flush();
    Ok(())
}

/// `delete`: containerd calls this when the shim died; undo what the shim left for this
/// container (and the whole pod when it is the pod's own container), then print a
/// DeleteResponse.
fn delete(flags: &Flags) -> Result<(), ShimError> {
    let bundle = if flags.bundle.is_empty() { std::env::current_dir().map_err(ShimError::Spawn)? } else { PathBuf::from(&flags.bundle) };
    let pod = read_bundle_spec(&bundle).map(|s| pod_id(&s, &flags.id)).unwrap_or_else(|_| flags.id.clone());
    let dir = pod_dir(&flags.namespace, &pod);
    pod::cleanup_container(&dir, &bundle, &flags.id);
    if pod == flags.id {
        pod::cleanup_pod(&dir);
    }
    let resp = containerd_shim_protos::api::DeleteResponse {
        pid: 0,
        exit_status: 137,
        exited_at: Some(containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::now()).into(),
        ..Default::default()
    };
    let bytes = resp.write_to_bytes().map_err(|e| ShimError::Write { path: "stdout".into(), source: std::io::Error::other(e) })?;
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(&bytes);
    let _ = stdout.flush();
    Ok(())
}

/// The daemon: serve the task API until the pod is gone.
fn serve(flags: Flags) -> Result<(), ShimError> {
    if flags.socket.is_empty() {
        return Err(ShimError::Args("the daemon needs -socket".into()));
    }
    let config = crate::config::Config::load(None);
    let level = config.as_ref().map(|c| c.log_level.clone()).unwrap_or_else(|_| "info".into());
    init_logging(&level, flags.debug);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ShimError::Runtime)?;
    rt.block_on(async move {
        let exit = Arc::new(tokio::sync::Notify::new());
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let events = service::Events::start(&ttrpc_address, &flags.namespace).await;
        let socket_path = PathBuf::from(flags.socket.trim_start_matches("unix://"));
        let retired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let svc = service::TaskService::new(flags.namespace.clone(), config, events, exit.clone(), socket_path.clone(), retired.clone());
        let task: Arc<dyn containerd_shim_protos::shim_async::Task + Send + Sync> = Arc::new(svc);
        let mut services = containerd_shim_protos::shim_async::create_task(task.clone());
        if let Some(v3) = containerd_shim_protos::shim_async::create_task(task).remove("containerd.task.v3.Task") {
            services.insert("containerd.task.v2.Task".into(), v3);
        }
        let serve_err = |reason: String| ShimError::Serve { address: flags.socket.clone(), reason };
        let mut server = ttrpc::r#async::Server::new()
            .bind(&flags.socket)
            .map_err(|e| serve_err(e.to_string()))?
            .register_service(services);
        server.start().await.map_err(|e| serve_err(e.to_string()))?;
        // Serving: close the pipe `start` waits on.
        // SAFETY: dup2 onto fd 1 of an fd we own (stderr is /dev/null here); no Rust object owns fd 1.
        unsafe {
            libc::dup2(2, 1);
        }
        tracing::info!(namespace = %flags.namespace, id = %flags.id, socket = %flags.socket, pid = std::process::id(), "shim serving");
        exit.notified().await;
        // Give the last replies (Shutdown's) a moment to leave.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = server.shutdown().await;
        // A retired pod's socket was removed already; the path may be a new shim's by now.
        if !retired.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(&socket_path);
        }
        tracing::info!(id = %flags.id, "shim exiting");
        Ok(())
    })
}

/// Logs go to the bundle's `log` FIFO, which containerd copies into its own log.
fn init_logging(level: &str, debug: bool) {
    let level = if debug { "debug" } else { level };
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let file = std::fs::OpenOptions::new().write(true).open("log");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    match file {
        Ok(f) => builder.with_writer(std::sync::Mutex::new(f)).init(),
        Err(_) => builder.with_writer(std::io::sink).init(),
    }
}
