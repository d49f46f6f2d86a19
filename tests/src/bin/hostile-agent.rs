//! A hostile guest's /init, for the boundary suite: what a tenant who owns the guest kernel can
//! put where hull-agent was. It runs the real agent behind itself (as PID 1 of a PID namespace
//! of its own, so the agent sets the guest up as usual, listening on unix sockets) and takes
//! the agent's vsock ports: the stdio port is passed through as is, the API port frame by frame,
//! except that every GetOOMEvent is answered at once, and forever, with an OOM kill of a
//! container that is not in the pod. Each answer is counted on the console:
//! `hostile-agent: oom answer N`.
//!
//! The boundary test appends it as /init to the real guest initramfs, with the real agent as
//! /hostile/hull-agent (see `tests/tests/boundary.rs`). Linked dynamically: the test adds the
//! libraries ldd names.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::socket::{self, AddressFamily, Backlog, Shutdown, SockFlag, SockType, VsockAddr};
use protobuf::{Message, MessageField};

/// The container the hostile guest says the OOM killer hit.
const FOREIGN: &str = "not-in-this-pod";
const AGENT: &str = "/hostile/hull-agent";
const API: &str = "/hostile/agent.sock";
const STDIO: &str = "/hostile/stdio.sock";

static ANSWERS: AtomicU64 = AtomicU64::new(0);

fn main() {
    // SAFETY: single-threaded here; the child only forks, execs and waits.
    if let nix::unistd::ForkResult::Child = unsafe { nix::unistd::fork() }.expect("fork") {
        // The agent runs as PID 1 of a new PID namespace (this process stays outside it: a
        // process that unshared its PID namespace cannot start threads).
        nix::sched::unshare(CloneFlags::CLONE_NEWPID).expect("unshare the PID namespace");
        // SAFETY: as above.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let err = std::os::unix::process::CommandExt::exec(std::process::Command::new(AGENT).args([
                    "--listen",
                    &format!("unix://{API}"),
                    "--stdio-listen",
                    &format!("unix://{STDIO}"),
                ]));
                eprintln!("hostile-agent: exec {AGENT}: {err}");
                std::process::exit(1);
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None);
                eprintln!("hostile-agent: the real agent ended: {status:?}");
                std::process::exit(1);
            }
        }
    }
    while !std::path::Path::new(API).exists() || !std::path::Path::new(STDIO).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (port, target, api) in [(hull_proto::AGENT_VSOCK_PORT, API, true), (hull_proto::STDIO_VSOCK_PORT, STDIO, false)] {
        let listener = listen(port);
        std::thread::spawn(move || loop {
            let Ok(conn) = socket::accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) else { continue };
            // SAFETY: accept returned a new descriptor that nothing else owns.
            let host = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) });
            let agent = UnixStream::connect(target).expect("connect to the real agent");
            std::thread::spawn(move || if api { proxy_api(host, agent) } else { proxy_bytes(host, agent) });
        });
    }
    eprintln!("hostile-agent: in place");
    // PID 1 reaps.
    loop {
        if nix::sys::wait::wait().is_err() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn listen(port: u32) -> OwnedFd {
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("vsock socket");
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).expect("bind the agent's vsock port");
    socket::listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
    fd
}

fn proxy_bytes(host: File, agent: UnixStream) {
    let (mut host_in, mut agent_in) = (host.try_clone().expect("dup"), agent.try_clone().expect("dup"));
    let (mut host_out, mut agent_out) = (host, agent);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut host_in, &mut agent_out);
        let _ = agent_out.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut agent_in, &mut host_out);
    let _ = socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&host_out.as_fd()), Shutdown::Write);
    let _ = up.join();
}

/// One ttrpc frame: the 10-byte header (length, stream id, type, flags; big-endian) and payload.
fn read_frame(from: &mut impl Read) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut header = vec![0u8; 10];
    from.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).ok()?;
    Some((header, payload))
}

fn proxy_api(host: File, agent: UnixStream) {
    let host_out = Arc::new(Mutex::new(host.try_clone().expect("dup")));
    let mut agent_in = agent.try_clone().expect("dup");
    let to_host = host_out.clone();
    std::thread::spawn(move || {
        while let Some((header, payload)) = read_frame(&mut agent_in) {
            let mut out = to_host.lock().expect("host writer");
            if out.write_all(&header).and_then(|()| out.write_all(&payload)).is_err() {
                return;
            }
        }
    });
    let (mut host_in, mut agent_out) = (host, agent);
    while let Some((header, payload)) = read_frame(&mut host_in) {
        let request = (header[8] == ttrpc::proto::MESSAGE_TYPE_REQUEST).then(|| ttrpc::Request::parse_from_bytes(&payload).ok()).flatten();
        if request.is_some_and(|r| r.method == "GetOOMEvent") {
            let event = hull_proto::agent::OOMEvent { container_id: FOREIGN.into(), ..Default::default() };
            let mut status = ttrpc::Status::new();
            status.code = ttrpc::Code::OK.into();
            let response = ttrpc::Response { status: MessageField::some(status), payload: event.write_to_bytes().expect("encode"), ..Default::default() };
            let body = response.write_to_bytes().expect("encode");
            let mut reply = (body.len() as u32).to_be_bytes().to_vec();
            reply.extend_from_slice(&header[4..8]);
            reply.extend_from_slice(&[ttrpc::proto::MESSAGE_TYPE_RESPONSE, 0]);
            reply.extend_from_slice(&body);
            let n = ANSWERS.fetch_add(1, Ordering::SeqCst) + 1;
            eprintln!("hostile-agent: oom answer {n}");
            if host_out.lock().expect("host writer").write_all(&reply).is_err() {
                return;
            }
        } else if agent_out.write_all(&header).and_then(|()| agent_out.write_all(&payload)).is_err() {
            return;
        }
    }
}
