//! hull-agent: the in-guest agent of hull. As PID 1 in a pod VM it sets the guest up and serves
//! the agent API on vsock; on a host it serves on a unix socket (tests, debugging).

mod agent;
mod cgroups;
mod container;
mod fd;
mod forward;
mod helper;
mod identity;
mod init;
mod launcher;
mod network;
mod peer;
mod process;
mod reaper;
mod sandbox;
mod service;
mod spec;
mod stdio;
mod storage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hull_proto::{agent_ttrpc, health_ttrpc};
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::{Agent, AgentConfig};

#[derive(Debug, Parser)]
#[command(name = "hull-agent", version, about = "hull's in-guest agent")]
struct Cli {
    /// Where to serve the agent API: `vsock:PORT` (in a guest) or `unix:PATH`.
    #[arg(long, default_value = "vsock:1024")]
    listen: String,
    /// Where to accept stdio stream connections. Default: `vsock:1025`, or PATH.stdio beside a
    /// unix API socket.
    #[arg(long)]
    stdio_listen: Option<String>,
    /// Where to accept port-forward connections. Default: `vsock:1026`, or PATH.forward beside a
    /// unix API socket.
    #[arg(long)]
    forward_listen: Option<String>,
    /// Bundles and container state.
    #[arg(long, default_value = "/run/hull-agent")]
    state_dir: PathBuf,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Option<Internal>,
}

#[derive(Debug, clap::Subcommand)]
enum Internal {
    /// Internal: create or exec through libcontainer in a single-threaded process.
    #[command(hide = true, subcommand)]
    Helper(helper::HelperCommand),
    /// Internal: hold a sandbox's namespaces.
    #[command(hide = true)]
    SandboxHolder {
        #[arg(long)]
        hostname: String,
        #[arg(long)]
        new_net: bool,
        /// KEY=VALUE, set in the sandbox's namespaces.
        #[arg(long)]
        sysctl: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("The address {0:?} is neither vsock:PORT nor unix:PATH.")]
    BadAddress(String),
    #[error("Cannot listen on {addr}: {source}.")]
    Listen { addr: String, source: std::io::Error },
    #[error("Cannot listen on {addr}: {source}.")]
    Serve { addr: String, source: ttrpc::Error },
    #[error("Cannot handle SIGTERM: {0}.")]
    Sigterm(#[source] std::io::Error),
    #[error(transparent)]
    Reaper(#[from] reaper::ReaperError),
    #[error("Cannot find the agent's own executable: {0}.")]
    Exe(#[source] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Vsock(u32),
    Unix(PathBuf),
}

impl Address {
    fn parse(s: &str) -> Result<Address, MainError> {
        if let Some(port) = s.strip_prefix("vsock:") {
            return port.parse().map(Address::Vsock).map_err(|_| MainError::BadAddress(s.into()));
        }
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(Address::Unix(p.into())),
            _ => Err(MainError::BadAddress(s.into())),
        }
    }

    fn ttrpc(&self) -> String {
        match self {
            Address::Vsock(port) => format!("vsock://-1:{port}"),
            Address::Unix(p) => format!("unix://{}", p.display()),
        }
    }
}

fn main() {
    let init_mode = nix::unistd::getpid().as_raw() == 1;
    // The kernel hands init the words of its command line it does not know; ignore them.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !init_mode => e.exit(),
        Err(_) => Cli::parse_from(["hull-agent"]),
    };
    match cli.cmd {
        Some(Internal::Helper(cmd)) => std::process::exit(helper::main(cmd)),
        Some(Internal::SandboxHolder { hostname, new_net, sysctl }) => {
            std::process::exit(sandbox::holder_main(&hostname, new_net, &sysctl))
        }
        None => {}
    }
    if init_mode {
        if let Err(e) = init::setup() {
            eprintln!("hull-agent: {e}");
        }
    }
    init_logging(&cli.log_level, cli.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(serve(cli, init_mode)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            std::process::exit(1);
        }
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "hull-agent failed");
            1
        }
    };
    if init_mode {
        tracing::info!("powering off");
        init::power_off();
    }
    std::process::exit(code);
}

fn init_logging(level: &str, json: bool) {
    // libcgroups warns about every v1 controller a host lacks; that is noise, not news.
    let level = if level.contains("libcgroups") { level.to_string() } else { format!("{level},libcgroups=error") };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `target=level` directives, no span or field filters (their regex engine is text the
    // guest would map at every boot). An unreadable filter logs at info.
    let filter: tracing_subscriber::filter::Targets = level.parse().unwrap_or_else(|_| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
}

async fn serve(cli: Cli, init_mode: bool) -> Result<(), MainError> {
    let api = Address::parse(&cli.listen)?;
    let stdio_addr = match (&cli.stdio_listen, &api) {
        (Some(s), _) => Address::parse(s)?,
        (None, Address::Vsock(_)) => Address::Vsock(hull_proto::STDIO_VSOCK_PORT),
        (None, Address::Unix(p)) => Address::Unix(hull_proto::stdio_socket_path(p)),
    };
    let forward_addr = match (&cli.forward_listen, &api) {
        (Some(s), _) => Address::parse(s)?,
        (None, Address::Vsock(_)) => Address::Vsock(hull_proto::FORWARD_VSOCK_PORT),
        (None, Address::Unix(p)) => Address::Unix(hull_proto::forward_socket_path(p)),
    };
    // Reap before anything can start a child.
    let reaper = reaper::Reaper::start()?;
    let exe = std::env::current_exe().map_err(MainError::Exe)?;
    let agent = Agent::new(AgentConfig { state_dir: cli.state_dir.clone(), init_mode, exe }, reaper);

    let service = service::Service { agent: agent.clone() };
    let serve_err = |addr: &Address| {
        let addr = format!("{addr:?}");
        move |source| MainError::Serve { addr, source }
    };
    for addr in [&api, &stdio_addr, &forward_addr] {
        if let Address::Unix(p) = addr {
            let _ = std::fs::remove_file(p);
        }
    }
    let mut server = ttrpc::r#async::Server::new().bind(&api.ttrpc()).map_err(serve_err(&api))?;
    if let Address::Vsock(_) = api {
        server = server.set_accept_hook(peer::HostOnly);
    }
    let mut server = server
        .register_service(health_ttrpc::create_health(Arc::new(service.clone())))
        .register_service(agent_ttrpc::create_agent(Arc::new(service)));
    for (addr, port) in [(&stdio_addr, StreamPort::Stdio), (&forward_addr, StreamPort::Forward)] {
        spawn_listener(addr, port, agent.clone()).map_err(|source| MainError::Listen { addr: format!("{addr:?}"), source })?;
    }
    server.start().await.map_err(serve_err(&api))?;
    tracing::info!(api = ?api, stdio = ?stdio_addr, forward = ?forward_addr, init_mode, version = service::AGENT_VERSION, "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).map_err(MainError::Sigterm)?;
    tokio::select! {
        _ = agent.shutdown.notified() => {
            // Let the DestroySandbox reply leave before the listener goes.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM: removing every container");
            if let Err(e) = agent.destroy_sandbox(Duration::from_secs(2)).await {
                tracing::error!(error = %e, "teardown incomplete");
            }
        }
    }
    // Long-poll calls (GetOOMEvent) never finish on their own; do not let them hold the
    // power-off.
    let _ = tokio::time::timeout(Duration::from_millis(300), server.shutdown()).await;
    for addr in [&api, &stdio_addr, &forward_addr] {
        if let Address::Unix(p) = addr {
            let _ = std::fs::remove_file(p);
        }
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// The agent's stream ports besides the API: each accepted connection is one stream.
#[derive(Debug, Clone, Copy)]
enum StreamPort {
    /// A process's stdin, stdout, stderr or terminal (`stdio`).
    Stdio,
    /// A TCP connection to the pod's loopback (`forward`).
    Forward,
}

impl StreamPort {
    fn name(self) -> &'static str {
        match self {
            StreamPort::Stdio => "stdio",
            StreamPort::Forward => "forward",
        }
    }

    async fn handle<S>(self, stream: S, agent: Arc<Agent>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match self {
            StreamPort::Stdio => stdio::handle(stream, agent).await,
            StreamPort::Forward => forward::handle(stream).await,
        }
    }
}

/// A listener of stream connections: unix (host) or vsock (guest).
trait StreamListener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(&mut self, port: StreamPort) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl StreamListener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&mut self, _port: StreamPort) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl StreamListener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_stream(&mut self, port: StreamPort) -> std::io::Result<Self::Stream> {
        loop {
            let (stream, peer) = self.accept().await?;
            if peer::admit(peer.cid(), port.name()) {
                return Ok(stream);
            }
        }
    }
}

fn accept_streams<L: StreamListener>(mut listener: L, port: StreamPort, agent: Arc<Agent>) {
    tokio::spawn(async move {
        loop {
            match listener.accept_stream(port).await {
                Ok(s) => {
                    tokio::spawn(port.handle(s, agent.clone()));
                }
                Err(e) => tracing::warn!(error = %e, port = port.name(), "accept failed"),
            }
        }
    });
}

fn spawn_listener(addr: &Address, port: StreamPort, agent: Arc<Agent>) -> std::io::Result<()> {
    match addr {
        Address::Unix(path) => accept_streams(tokio::net::UnixListener::bind(path)?, port, agent),
        Address::Vsock(vport) => accept_streams(
            tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, *vport))?,
            port,
            agent,
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(Address::parse("vsock:1024").unwrap(), Address::Vsock(1024));
        assert_eq!(Address::parse("unix:/run/a.sock").unwrap(), Address::Unix("/run/a.sock".into()));
        assert_eq!(Address::parse("unix:/run/a.sock").unwrap().ttrpc(), "unix:///run/a.sock");
        assert!(Address::parse("tcp:1").is_err());
        assert!(Address::parse("unix:").is_err());
        assert!(Address::parse("vsock:x").is_err());
    }
}
