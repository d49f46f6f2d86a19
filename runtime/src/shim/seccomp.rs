//! The shim's own seccomp filter, installed on its one thread before the runtime starts (every
//! later thread inherits it, and so does every process the shim starts: `hull-vmm jail`, QEMU,
//! iptables). The shim mounts, enters namespaces and starts programs, so an allowlist would
//! hold little; the filter denies what no part of a pod's host side does and an attacker who
//! took the shim over wants: loading kernel code, kexec, BPF and perf, tracing or reading other
//! processes, key rings, raw port I/O, setting the clock, swap, reboot, accounting, quotas,
//! userfaultfd. A denied call kills the process (SIGSYS).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum ShimSeccompError {
    #[error("Cannot build the shim's seccomp filter: {0}.")]
    Build(#[source] seccompiler::BackendError),
    #[error("Cannot install the shim's seccomp filter: {0}.")]
    Apply(#[source] seccompiler::Error),
}

const DENIED: &[i64] = &[
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_userfaultfd,
];

/// The compiled filter.
pub fn filter() -> Result<BpfProgram, ShimSeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::KillProcess, TargetArch::x86_64).map_err(ShimSeccompError::Build)?;
    BpfProgram::try_from(filter).map_err(ShimSeccompError::Build)
}

/// Installs the filter on every thread of the process, with no_new_privs (seccompiler sets it;
/// nothing the shim starts gains privileges by exec: it runs as root or gives them up itself).
pub fn install() -> Result<(), ShimSeccompError> {
    seccompiler::apply_filter_all_threads(&filter()?).map_err(ShimSeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// Runs `f` in a forked child under the filter; returns how the child ended.
    fn under_filter(f: fn()) -> std::process::ExitStatus {
        let program = filter().expect("filter");
        // SAFETY: fork in a test; the child installs a filter compiled before the fork, makes
        // raw system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if seccompiler::apply_filter(&program).is_ok() {
                f();
                0
            } else {
                2
            };
            // SAFETY: ends the child without the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked into a live local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        std::process::ExitStatus::from_raw(status)
    }

    #[test]
    fn the_shim_may_mount_and_unshare_but_not_trace_or_load_kernel_code() {
        // What the shim does: namespaces and mounts (EPERM or EINVAL here is fine, SIGSYS not).
        let st = under_filter(|| {
            // SAFETY: unshare and umount2 with arguments that change nothing for a test child.
            unsafe {
                libc::syscall(libc::SYS_unshare, 0);
                libc::syscall(libc::SYS_umount2, c"/nonexistent".as_ptr(), 0);
            }
        });
        assert_eq!(st.code(), Some(0), "{st:?}");
        fn ptrace() {
            // SAFETY: ptrace(PTRACE_PEEKDATA) of pid 1; the filter kills first.
            unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 1, 0, 0) };
        }
        fn load_module() {
            // SAFETY: finit_module of fd -1; the filter kills first.
            unsafe { libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0) };
        }
        for denied in [ptrace as fn(), load_module] {
            let st = under_filter(denied);
            assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
        }
    }
}
