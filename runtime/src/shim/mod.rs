//! containerd-shim-hull-v2: the shim v2 containerd runs for `runtime_type =
//! "io.containerd.hull.v2"`. One shim process serves one pod; the pod is one microVM.
//!
//! Why hull writes its own start/serve frame instead of `containerd_shim::run`: the 0.12 crate
//! speaks only task API v3 and answers `start` in containerd 2's JSON form, while Debian's
//! containerd 1.6 calls `containerd.task.v2.Task` and reads a bare address. The messages of v2
//! and v3 are identical, so the same service is registered under both names, and `start`
//! prints the address. (0.11 would speak v2 but needs ttrpc 0.9; the agent client is on 0.10.)

pub mod container;
mod delete;
pub mod events;
pub mod io;
pub mod seccomp;
mod start;
pub mod task;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use containerd_shim::Flags;

pub const RUNTIME_ID: &str = "io.containerd.hull.v2";
/// The CRI annotations that group containers into a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("Cannot parse the shim's arguments: {0}.")]
    Args(String),
    #[error("Unknown shim action {0:?} (expected start, delete, or none to serve).")]
    Action(String),
    #[error("Cannot read the bundle's OCI spec {path:?}: {source}.")]
    ReadSpec { path: PathBuf, source: std::io::Error },
    #[error("The bundle's OCI spec {path:?} is not valid JSON: {source}.")]
    ParseSpec { path: PathBuf, source: serde_json::Error },
    #[error("Cannot start the shim daemon: {0}.")]
    Spawn(#[source] std::io::Error),
    #[error("The shim daemon exited before serving on {address}: {status}.")]
    DaemonDied { address: String, status: String },
    #[error("Cannot listen on the shim's socket {path:?}: {source}.")]
    Listen { path: PathBuf, #[source] source: std::io::Error },
    #[error("Cannot serve the task API on {address}: {reason}.")]
    Serve { address: String, reason: String },
    #[error("Cannot write {path:?}: {source}.")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("Cannot start the async runtime: {0}.")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    BadId(#[from] crate::pod::state::BadId),
    #[error(transparent)]
    Seccomp(#[from] seccomp::ShimSeccompError),
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
        "start" => start::start(&flags),
        "delete" => delete::delete(&flags),
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
    let text = std::fs::read_to_string(&path).map_err(|source| ShimError::ReadSpec { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| ShimError::ParseSpec { path, source })
}

pub fn annotation<'a>(spec: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?.get(key)?.as_str()
}

/// Which pod a container belongs to: the CRI sandbox id, else (ctr run) the container itself.
/// The id becomes the pod's state directory, so one that is no identifier is refused.
pub fn pod_id(spec: &serde_json::Value, id: &str) -> Result<String, crate::pod::state::BadId> {
    let pod = annotation(spec, SANDBOX_ID_ANNOTATION).filter(|s| !s.is_empty()).unwrap_or(id);
    crate::pod::state::check_id("pod id (annotation io.kubernetes.cri.sandbox-id)", pod)?;
    Ok(pod.to_string())
}

/// The daemon: serve the task API until the pod is gone.
fn serve(flags: Flags) -> Result<(), ShimError> {
    if flags.socket.is_empty() {
        return Err(ShimError::Args("the daemon needs -socket".into()));
    }
    let config = crate::config::Config::load(None);
    let level = config.as_ref().map(|c| c.log_level.clone()).unwrap_or_else(|_| "info".into());
    init_logging(&level, flags.debug);
    // One malloc arena: glibc gives each thread that allocates an arena of its own, and with the
    // runtime's threads, the blocking pool and the network-namespace thread a pod's shim kept
    // four, each a partly used heap. A shim allocates little and seldom; one lock is no cost.
    // SAFETY: mallopt changes allocator settings only; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // Before the runtime's threads: each inherits it.
    seccomp::install().map_err(ShimError::Seccomp)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ShimError::Runtime)?;
    rt.block_on(async move {
        let exit = Arc::new(tokio::sync::Notify::new());
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let events = events::Events::start(&ttrpc_address, &flags.namespace).await;
        let socket_path = PathBuf::from(flags.socket.trim_start_matches("unix://"));
        let retired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let svc = task::TaskService::new(flags.namespace.clone(), config, events, exit.clone(), socket_path.clone(), retired.clone());
        let task: Arc<dyn containerd_shim_protos::shim_async::Task + Send + Sync> = Arc::new(svc);
        let mut services = containerd_shim_protos::shim_async::create_task(task.clone());
        if let Some(v3) = containerd_shim_protos::shim_async::create_task(task).remove("containerd.task.v3.Task") {
            services.insert("containerd.task.v2.Task".into(), v3);
        }
        let serve_err = |reason: String| ShimError::Serve { address: flags.socket.clone(), reason };
        // Whoever connects drives the pod: the socket is owner-only from the moment it exists.
        let listener = hull_proto::host_socket::bind_owner_only(&socket_path)
            .and_then(ttrpc::r#async::transport::Listener::try_from)
            .map_err(|source| ShimError::Listen { path: socket_path.clone(), source })?;
        let mut server = ttrpc::r#async::Server::new().add_listener(listener).register_service(services);
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
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `target=level` directives (`info,hull_runtime=debug`), no span or field filters: their
    // regex engine was 240 KB of every shim's text. An unreadable filter logs at info.
    let filter: tracing_subscriber::filter::Targets = level.parse().unwrap_or_else(|_| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    let file = std::fs::OpenOptions::new().write(true).open("log");
    let layer = tracing_subscriber::fmt::layer().with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    match file {
        Ok(f) => registry.with(layer.with_writer(std::sync::Mutex::new(f))).init(),
        Err(_) => registry.with(layer.with_writer(std::io::sink)).init(),
    }
}
