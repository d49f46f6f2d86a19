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
use libcontainer::syscall::syscall::SyscallType;
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
            let pid = ContainerBuilder::new(id, SyscallType::Linux)
                .with_root_path(root)
                .map_err(|e| error_chain(&e))?
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
