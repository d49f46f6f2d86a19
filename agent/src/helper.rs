//! The short-lived helper process that calls libcontainer.
//!
//! libcontainer creates a container by cloning processes from the calling process. Cloning from
//! the multi-threaded agent would let the child inherit locks held by other threads (allocator,
//! tracing), so the agent re-executes itself as a single-threaded helper for every create and
//! exec. The helper's stdin/stdout/stderr are the new process's stdio, and it reports one JSON
//! line (`{"pid":N}` or `{"error":"..."}`) on descriptor 3, then exits. The container process
//! outlives it and is reparented to the agent (PID 1, or a child subreaper on a host).

use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::{LinuxSeccomp, Spec};
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use serde::{Deserialize, Serialize};

/// The descriptor the helper reports on.
pub const REPORT_FD: i32 = 3;

#[derive(Debug, clap::Subcommand)]
pub enum HelperCommand {
    /// Create a container from BUNDLE/config.json; its init waits for StartContainer.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        console_socket: Option<PathBuf>,
    },
    /// Run the OCI process in PROCESS (JSON) inside the running container ID.
    Exec {
        #[arg(long)]
        id: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        process: PathBuf,
        #[arg(long)]
        console_socket: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Report {
    Pid(i32),
    Error(String),
}

/// An error and all its causes on one line: libcontainer's top-level messages alone are vague.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

fn run(cmd: HelperCommand) -> Result<i32, String> {
    match cmd {
        HelperCommand::Create { id, root, bundle, console_socket } => {
            let container = ContainerBuilder::new(id, SyscallType::Linux)
                .with_root_path(root)
                .map_err(|e| error_chain(&e))?
                .with_console_socket(console_socket)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| error_chain(&e))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer created the container but reported no pid".to_string())
        }
        HelperCommand::Exec { id, root, process, console_socket } => {
            let seccomp = container_seccomp(&root, &id)?;
            let pid = ContainerBuilder::new(id, SyscallType::Linux)
                .with_root_path(root)
                .map_err(|e| error_chain(&e))?
                .with_executor(SeccompThenExec { seccomp })
                .with_console_socket(console_socket)
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| error_chain(&e))?;
            Ok(pid.as_raw())
        }
    }
}

/// Runs a helper command and reports on [`REPORT_FD`]. Returns the helper's exit code.
pub fn main(cmd: HelperCommand) -> i32 {
    let report = match run(cmd) {
        Ok(pid) => Report::Pid(pid),
        Err(e) => Report::Error(e),
    };
    // SAFETY: the agent starts every helper with REPORT_FD open on the write end of a pipe it
    // owns; nothing else in this process uses that descriptor.
    let mut out = unsafe { std::fs::File::from_raw_fd(REPORT_FD) };
    let mut line = serde_json::to_string(&report).unwrap_or_else(|_| "{\"error\":\"unreportable\"}".into());
    line.push('\n');
    match (out.write_all(line.as_bytes()), &report) {
        (Ok(()), Report::Pid(_)) => 0,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_round_trip() {
        for r in [Report::Pid(42), Report::Error("no such file".into())] {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), r);
        }
        assert_eq!(serde_json::to_string(&Report::Pid(7)).unwrap(), r#"{"pid":7}"#);
    }
}

/// The seccomp profile of a running container (its spec's `linux.seccomp`).
fn container_seccomp(root: &std::path::Path, id: &str) -> Result<Option<LinuxSeccomp>, String> {
    let container = libcontainer::container::Container::load(root.join(id)).map_err(|e| error_chain(&e))?;
    let config = container.bundle().join("config.json");
    let spec = Spec::load(&config).map_err(|e| format!("cannot read {config:?}: {}", error_chain(&e)))?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// The workload of an exec: the container's seccomp filter, then libcontainer's own execve.
///
/// runc confines every process of a container with its seccomp profile, execs included;
/// libcontainer 0.7 builds an exec's spec without `linux.seccomp`, so an exec would escape the
/// profile (a `kubectl exec` could `chmod` where the profile forbids it). The executor runs in
/// the exec's process after libcontainer's set-up, right before execve, with the exec's
/// capabilities already in place. Installing a filter takes CAP_SYS_ADMIN or `no_new_privs`;
/// where the process has neither, it gets `no_new_privs` first (stricter than runc, which
/// installs such a filter before dropping capabilities: a setuid binary in such an exec does
/// not gain privileges).
#[derive(Clone)]
struct SeccompThenExec {
    seccomp: Option<LinuxSeccomp>,
}

impl Executor for SeccompThenExec {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            if !has_effective_sys_admin() {
                nix::sys::prctl::set_no_new_privs().map_err(|e| ExecutorError::Other(format!("cannot set no_new_privs for the seccomp filter: {e}")))?;
            }
            match libcontainer::seccomp::initialize_seccomp(seccomp) {
                // A notify listener (SCMP_ACT_NOTIFY) has nobody to serve it in the guest: its
                // syscalls fail as with no listener.
                Ok(Some(fd)) => drop(unsafe_owned(fd)),
                Ok(None) => {}
                Err(e) => return Err(ExecutorError::Other(format!("cannot install the container's seccomp filter: {}", error_chain(&e)))),
            }
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

/// Whether this process has CAP_SYS_ADMIN in its effective set (what installing a seccomp
/// filter without no_new_privs takes).
fn has_effective_sys_admin() -> bool {
    caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SYS_ADMIN).unwrap_or(false)
}

fn unsafe_owned(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    // SAFETY: libseccomp returned this notify descriptor to us alone; nothing else closes it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}
