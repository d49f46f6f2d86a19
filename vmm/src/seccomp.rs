//! Per-thread seccomp filters (seccompiler), installed once a VM is set up. A thread that
//! makes a system call its filter does not allow kills the whole VMM (SIGSYS), which is what
//! should happen to a VMM whose device or vCPU code a guest has subverted.
//!
//! - vCPU threads and the main thread: allowlists of what they do after set-up (reads and
//!   writes on fds they already hold, memory management, futexes, signals, time; for vCPUs
//!   only the three KVM ioctls they make).
//! - Device workers: they serve a guest-controlled FUSE passthrough and vsock connections, so
//!   they open, stat, read, write, accept and connect freely; their filter denies instead what
//!   no device needs and an attacker wants: running programs, namespaces and mounts, tracing
//!   other processes, loading kernel code, BPF, reboot, key rings.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Cannot build the {which} seccomp filter: {source}.")]
    Build { which: &'static str, source: seccompiler::BackendError },
    #[error("Cannot install the seccomp filter: {0}.")]
    Apply(#[source] seccompiler::Error),
}

/// A compiled filter, ready to install on the calling thread.
#[derive(Clone)]
pub struct Filter {
    which: &'static str,
    program: BpfProgram,
}

impl Filter {
    pub fn apply(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.program).map_err(SeccompError::Apply)?;
        tracing::debug!(filter = self.which, "seccomp filter installed");
        Ok(())
    }

    pub fn which(&self) -> &'static str {
        self.which
    }
}

fn compile(which: &'static str, syscalls: &[i64], mismatch: SeccompAction, matched: SeccompAction) -> Result<Filter, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = syscalls.iter().map(|&nr| (nr, Vec::new())).collect();
    let err = |source| SeccompError::Build { which, source };
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(err)?;
    let program = BpfProgram::try_from(filter).map_err(err)?;
    Ok(Filter { which, program })
}

/// What every hull-vmm thread does after set-up: memory, futexes, signals, time, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    // F_GETFD: Rust's debug builds check an fd is open before closing it.
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A panic's report asks for the working directory; let it report instead of dying of
    // SIGSYS with no message.
    libc::SYS_getcwd,
];

/// `_IOR(KVMIO, nr, T)`: the request number of a KVM ioctl that reads a `T`.
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    const KVMIO: u64 = 0xae;
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// The only ioctls a vCPU thread makes once it runs: KVM_RUN, and the register reads of an
/// error report. Everything else a device model needs was set up before the filters.
const VCPU_IOCTLS: [u64; 3] = [
    0xae80, // KVM_RUN = _IO(KVMIO, 0x80)
    kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),  // KVM_GET_REGS
    kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>()), // KVM_GET_SREGS
];

/// vCPU threads: KVM_RUN and the register reads of an error report (no other ioctl), the port
/// and MMIO devices (console writes, eventfd writes for interrupts and worker wake-ups).
pub fn vcpu() -> Result<Filter, SeccompError> {
    let which = "vcpu";
    let err = |source| SeccompError::Build { which, source };
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = COMMON.iter().map(|&nr| (nr, Vec::new())).collect();
    let mut ioctls = Vec::new();
    for request in VCPU_IOCTLS {
        let condition = seccompiler::SeccompCondition::new(1, seccompiler::SeccompCmpArgLen::Dword, seccompiler::SeccompCmpOp::Eq, request).map_err(err)?;
        ioctls.push(seccompiler::SeccompRule::new(vec![condition]).map_err(err)?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    let program = BpfProgram::try_from(filter).map_err(err)?;
    Ok(Filter { which, program })
}

/// The main thread once the vCPUs run: it waits for the VM's end, kicks the vCPUs out of
/// KVM_RUN with a signal, joins them and frees the VM.
pub fn main_thread() -> Result<Filter, SeccompError> {
    let mut list = COMMON.to_vec();
    list.extend([libc::SYS_tgkill, libc::SYS_nanosleep, libc::SYS_clock_nanosleep, libc::SYS_ioctl, libc::SYS_getpid, libc::SYS_gettid]);
    compile("main", &list, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// The API thread: accepts control connections, reads a line, answers, kicks vCPUs on pause.
pub fn api_thread() -> Result<Filter, SeccompError> {
    let mut list = COMMON.to_vec();
    list.extend([libc::SYS_accept, libc::SYS_accept4, libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_tgkill, libc::SYS_getpid, libc::SYS_gettid]);
    compile("api", &list, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// The waiter of `hull-vmm jail` (see `jail`): it waits for the jailed process and exits as it
/// did.
pub fn jail_waiter() -> Result<Filter, SeccompError> {
    let mut list = COMMON.to_vec();
    list.extend([libc::SYS_wait4, libc::SYS_waitid]);
    compile("jail waiter", &list, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// Device workers: everything but what no device needs.
pub fn device() -> Result<Filter, SeccompError> {
    let denied = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_adjtimex,
        libc::SYS_syslog,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_personality,
    ];
    compile("device", &denied, SeccompAction::Allow, SeccompAction::KillProcess)
}

/// The filters of one VM, built before any is installed.
#[derive(Clone)]
pub struct VmFilters {
    pub vcpu: Filter,
    pub main: Filter,
    pub device: Filter,
}

impl VmFilters {
    pub fn new() -> Result<VmFilters, SeccompError> {
        Ok(VmFilters { vcpu: vcpu()?, main: main_thread()?, device: device()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child and returns how the child ended. The child only installs a
    /// prepared filter and makes raw system calls, which is safe after fork.
    fn in_child(f: impl FnOnce() -> i32) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        // SAFETY: fork in a test process; the child touches no lock another thread may hold
        // (the filters are compiled before the fork) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = f();
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is a live local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        std::process::ExitStatus::from_raw(status)
    }

    #[test]
    fn vcpu_filter_allows_its_calls_and_kills_on_others() {
        let filter = vcpu().expect("filter");
        let ok = filter.clone();
        let st = in_child(move || {
            if ok.apply().is_err() {
                return 2;
            }
            // SAFETY: getrandom into a live local buffer; write of zero bytes to stdout.
            unsafe {
                let mut b = [0u8; 4];
                libc::syscall(libc::SYS_getrandom, b.as_mut_ptr(), 4, 0);
                libc::syscall(libc::SYS_write, 1, b.as_ptr(), 0);
            }
            0
        });
        assert_eq!(st.code(), Some(0), "allowed calls pass: {st:?}");
        let st = in_child(move || {
            if filter.apply().is_err() {
                return 2;
            }
            // SAFETY: socket(2) with constant arguments; the filter kills the process first.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            0
        });
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGSYS), "a vCPU opening a socket dies: {st:?}");
    }

    #[test]
    fn vcpu_filter_allows_kvm_run_but_no_other_ioctl() {
        use std::os::unix::process::ExitStatusExt;
        let filter = vcpu().expect("filter");
        let ok = filter.clone();
        let st = in_child(move || {
            if ok.apply().is_err() {
                return 2;
            }
            for request in VCPU_IOCTLS {
                // SAFETY: an ioctl on fd -1 with a vCPU request number: EBADF, after the filter.
                unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
            }
            0
        });
        assert_eq!(st.code(), Some(0), "KVM_RUN and the register reads pass: {st:?}");
        let st = in_child(move || {
            if filter.apply().is_err() {
                return 2;
            }
            // SAFETY: TIOCSTI (push input into a terminal) on fd -1; the filter kills first.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, libc::TIOCSTI, 0) };
            0
        });
        assert_eq!(st.signal(), Some(libc::SIGSYS), "a vCPU making another ioctl dies: {st:?}");
    }

    #[test]
    fn device_filter_denies_exec_and_mount_but_allows_files_and_sockets() {
        let filter = device().expect("filter");
        let ok = filter.clone();
        let st = in_child(move || {
            if ok.apply().is_err() {
                return 2;
            }
            // SAFETY: socket and close with constant arguments.
            let fd = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                return 3;
            }
            // SAFETY: closes the socket just made.
            unsafe { libc::syscall(libc::SYS_close, fd) };
            0
        });
        assert_eq!(st.code(), Some(0), "{st:?}");
        let st = in_child(move || {
            if filter.apply().is_err() {
                return 2;
            }
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: execve with a NUL-terminated path and argv; the filter kills first.
            unsafe { libc::syscall(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), std::ptr::null::<*const i8>()) };
            0
        });
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
    }
}
