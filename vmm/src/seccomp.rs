//! Per-thread seccomp filters (seccompiler), installed once a VM is set up. A thread that
//! makes a system call its filter does not allow kills the whole VMM (SIGSYS), which is what
//! should happen to a VMM whose device or vCPU code a guest has subverted.
//!
//! - vCPU threads and the main thread: allowlists of what they do after set-up (reads and
//!   writes on fds they already hold, memory management, futexes, signals, time; for vCPUs
//!   only the three KVM ioctls they make).
//! - Device workers (and every thread of a vhost-user backend): an allowlist too (`DEVICE`).
//!   They serve a guest-controlled FUSE passthrough and vsock connections, so it is long
//!   (descriptor-relative file calls, xattrs, per-thread credentials, unix sockets), but it
//!   has no exec, no new process (clone only with CLONE_THREAD; clone3 answers ENOSYS so that
//!   glibc falls back to clone), no namespaces or mounts, no ptrace, no kernel code, no BPF,
//!   no key rings, no clock, and one ioctl (FIONBIO).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Cannot build the {which} seccomp filter: {source}.")]
    Build { which: &'static str, source: seccompiler::BackendError },
    #[error("Cannot install the seccomp filter: {0}.")]
    Apply(#[source] seccompiler::Error),
    #[error("A thread cannot give up root before its filter ({what}): {source}.")]
    Privileges { what: &'static str, source: std::io::Error },
}

/// A compiled filter, ready to install on the calling thread.
#[derive(Clone)]
pub struct Filter {
    which: &'static str,
    /// Installed in order; the kernel runs them all and the strictest answer wins.
    programs: Vec<BpfProgram>,
    /// The unprivileged uid and gid the thread takes before its filter (`run_as`).
    run_as: Option<(u32, u32)>,
}

impl Filter {
    /// This filter, applied by a thread that first gives up root for `uid:gid` and with it
    /// every capability. Credentials are per thread in Linux: a hull-vmm that must stay uid 0
    /// for its virtio-fs worker (the guest's file owners) keeps root on that thread alone.
    pub fn run_as(mut self, ids: Option<(u32, u32)>) -> Filter {
        self.run_as = ids;
        self
    }

    /// This filter for a thread that keeps the process's privileges (the virtio-fs worker).
    pub fn keeping_privileges(&self) -> Filter {
        Filter { run_as: None, ..self.clone() }
    }

    pub fn apply(&self) -> Result<(), SeccompError> {
        if let Some((uid, gid)) = self.run_as {
            drop_thread_privileges(uid, gid)?;
        }
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(SeccompError::Apply)?;
        }
        tracing::debug!(filter = self.which, "seccomp filter installed");
        Ok(())
    }

    /// Installs the filter on every thread of the process (and so on every later one).
    /// Credentials are per thread: `run_as` is not applied here (see `apply`).
    pub fn apply_all_threads(&self) -> Result<(), SeccompError> {
        debug_assert!(self.run_as.is_none(), "run_as applies to one thread: use apply");
        for program in &self.programs {
            seccompiler::apply_filter_all_threads(program).map_err(SeccompError::Apply)?;
        }
        tracing::debug!(filter = self.which, "seccomp filter installed on every thread");
        Ok(())
    }

    pub fn which(&self) -> &'static str {
        self.which
    }
}

/// The calling thread (only it: the raw system calls, not glibc's, which change every thread)
/// leaves its supplementary groups and becomes `uid:gid`; leaving uid 0 clears its permitted
/// and effective capabilities, and without CAP_SETUID it cannot come back.
fn drop_thread_privileges(uid: u32, gid: u32) -> Result<(), SeccompError> {
    let check = |what, r: libc::c_long| if r == 0 { Ok(()) } else { Err(SeccompError::Privileges { what, source: std::io::Error::last_os_error() }) };
    // SAFETY: setgroups with an empty list reads no memory.
    check("setgroups", unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })?;
    // SAFETY: setresgid and setresuid take plain integers.
    check("setresgid", unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    // SAFETY: as above.
    check("setresuid", unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })?;
    Ok(())
}

fn compile(which: &'static str, syscalls: &[i64], mismatch: SeccompAction, matched: SeccompAction) -> Result<Filter, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = syscalls.iter().map(|&nr| (nr, Vec::new())).collect();
    let err = |source| SeccompError::Build { which, source };
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(err)?;
    let program = BpfProgram::try_from(filter).map_err(err)?;
    Ok(Filter { which, programs: vec![program], run_as: None })
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

/// `_IOWR(KVMIO, nr, T)`.
const fn kvm_iowr(nr: u64, size: usize) -> u64 {
    kvm_ior(nr, size) | (1 << 30)
}

/// The only ioctls a vCPU thread makes once it runs: KVM_RUN, the register reads of an error
/// report, and the reads of its state for a snapshot. Everything else a device model needs
/// was set up before the filters; no vCPU thread sets anything.
const VCPU_IOCTLS: [u64; 11] = [
    0xae80, // KVM_RUN = _IO(KVMIO, 0x80)
    kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),  // KVM_GET_REGS
    kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>()), // KVM_GET_SREGS
    kvm_iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()), // KVM_GET_MSRS
    kvm_ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>()), // KVM_GET_LAPIC
    kvm_ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>()), // KVM_GET_MP_STATE
    kvm_ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
    kvm_ior(0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>()), // KVM_GET_DEBUGREGS
    kvm_ior(0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>()), // KVM_GET_XSAVE
    kvm_ior(0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>()), // KVM_GET_XCRS
    0xaea3, // KVM_GET_TSC_KHZ = _IO(KVMIO, 0xa3)
];

/// The VM ioctls of a snapshot, on the API thread: the irqchip, PIT and clock reads.
const SNAPSHOT_VM_IOCTLS: [u64; 3] = [
    kvm_iowr(0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()), // KVM_GET_IRQCHIP
    kvm_ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()), // KVM_GET_PIT2
    kvm_ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>()), // KVM_GET_CLOCK
];

/// vCPU threads: KVM_RUN and the register reads of an error report (no other ioctl), the port
/// and MMIO devices (console writes, eventfd writes for interrupts and worker wake-ups).
pub fn vcpu() -> Result<Filter, SeccompError> {
    with_ioctls("vcpu", COMMON, &VCPU_IOCTLS)
}

/// A filter allowing `calls`, and ioctl with the `ioctls` requests only.
fn with_ioctls(which: &'static str, calls: &[i64], ioctls: &[u64]) -> Result<Filter, SeccompError> {
    let err = |source| SeccompError::Build { which, source };
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = calls.iter().map(|&nr| (nr, Vec::new())).collect();
    let mut allowed = Vec::new();
    for &request in ioctls {
        let condition = seccompiler::SeccompCondition::new(1, seccompiler::SeccompCmpArgLen::Dword, seccompiler::SeccompCmpOp::Eq, request).map_err(err)?;
        allowed.push(seccompiler::SeccompRule::new(vec![condition]).map_err(err)?);
    }
    rules.insert(libc::SYS_ioctl, allowed);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    let program = BpfProgram::try_from(filter).map_err(err)?;
    Ok(Filter { which, programs: vec![program], run_as: None })
}

/// The main thread once the vCPUs run: it waits for the VM's end, kicks the vCPUs out of
/// KVM_RUN with a signal, joins them and frees the VM.
pub fn main_thread() -> Result<Filter, SeccompError> {
    let mut list = COMMON.to_vec();
    list.extend([libc::SYS_tgkill, libc::SYS_nanosleep, libc::SYS_clock_nanosleep, libc::SYS_ioctl, libc::SYS_getpid, libc::SYS_gettid]);
    compile("main", &list, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// The API thread: accepts control connections, reads a line, answers, kicks vCPUs on pause,
/// and writes a snapshot (its directory, its files, the VM's irqchip, PIT and clock).
pub fn api_thread() -> Result<Filter, SeccompError> {
    let mut list = COMMON.to_vec();
    list.extend([libc::SYS_accept, libc::SYS_accept4, libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_tgkill, libc::SYS_getpid, libc::SYS_gettid]);
    list.extend([
        libc::SYS_openat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_ftruncate,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
    ]);
    with_ioctls("api", &list, &SNAPSHOT_VM_IOCTLS)
}

/// The waiter of `hull-vmm jail` (see `jail`): it waits for the jailed process and exits as it
/// did.
pub fn jail_waiter() -> Result<Filter, SeccompError> {
    let mut list = COMMON.to_vec();
    list.extend([libc::SYS_wait4, libc::SYS_waitid]);
    compile("jail waiter", &list, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// What a device serves a guest with, beyond `COMMON`: threads (a vhost-user daemon starts
/// its own), polling, the queues' eventfds, disk and tap I/O, the vsock muxer's unix sockets,
/// and a FUSE passthrough acting as the guest's file owners (fuse-backend-rs: *at calls on
/// descriptors it holds, xattrs, per-thread setresuid/setresgid, its own /proc/self/fd).
/// Measured: every call the QEMU-engine suites and the L1 builtin suite make, with the filter
/// logging instead of killing. Not here, so fatal: exec, fork (a thread's clone passes only
/// with CLONE_THREAD, see `device`), namespaces, mounts, ptrace, kernel code, BPF, keys, the
/// clock, reboot, and any ioctl.
const DEVICE: &[i64] = &[
    // Threads and their set-up.
    libc::SYS_mprotect,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_rt_sigaction,
    libc::SYS_tgkill,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    // Polling and wake-ups.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Disk, tap and file data.
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    // Sockets: vhost-user (descriptors in messages), the vsock muxer's host side.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // The FUSE passthrough.
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    // A vhost-user backend removes its socket when its VM is gone.
    libc::SYS_unlink,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_umask,
    libc::SYS_fchdir,
    libc::SYS_flock,
    libc::SYS_fadvise64,
];

/// Device workers (and the vhost-user backends, every thread): `COMMON` and `DEVICE`, with
/// `clone` only for a thread (CLONE_THREAD), not a new process or namespace; anything else
/// kills the process.
pub fn device() -> Result<Filter, SeccompError> {
    let which = "device";
    let err = |source| SeccompError::Build { which, source };
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = COMMON.iter().chain(DEVICE).map(|&nr| (nr, Vec::new())).collect();
    let thread = libc::CLONE_THREAD as u64;
    let condition = seccompiler::SeccompCondition::new(0, seccompiler::SeccompCmpArgLen::Qword, seccompiler::SeccompCmpOp::MaskedEq(thread), thread).map_err(err)?;
    rules.insert(libc::SYS_clone, vec![seccompiler::SeccompRule::new(vec![condition]).map_err(err)?]);
    // The vsock muxer makes its host sockets non-blocking (FIONBIO); no other ioctl.
    let fionbio = seccompiler::SeccompCondition::new(1, seccompiler::SeccompCmpArgLen::Dword, seccompiler::SeccompCmpOp::Eq, libc::FIONBIO).map_err(err)?;
    rules.insert(libc::SYS_ioctl, vec![seccompiler::SeccompRule::new(vec![fionbio]).map_err(err)?]);
    // clone3 passes its flags in memory a filter cannot read: the allowlist lets it through to
    // a second filter that answers ENOSYS (the stricter answer wins), and glibc falls back to
    // clone, whose flags the allowlist checks.
    rules.insert(libc::SYS_clone3, Vec::new());
    let allow = SeccompFilter::new(rules, DEVICE_MISMATCH, SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    let no_clone3 = SeccompFilter::new([(libc::SYS_clone3, Vec::new())].into(), SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64).map_err(err)?;
    // The ENOSYS filter first: the allowlist, installed under it, needs no seccomp(2) itself.
    let programs = vec![BpfProgram::try_from(no_clone3).map_err(err)?, BpfProgram::try_from(allow).map_err(err)?];
    Ok(Filter { which, programs, run_as: None })
}
const DEVICE_MISMATCH: SeccompAction = SeccompAction::KillProcess;

/// The filters of one VM, built before any is installed.
#[derive(Clone)]
pub struct VmFilters {
    pub vcpu: Filter,
    pub main: Filter,
    pub device: Filter,
}

impl VmFilters {
    /// `run_as`: the ids every thread but a file server's takes first (see `Filter::run_as`).
    pub fn new(run_as: Option<(u32, u32)>) -> Result<VmFilters, SeccompError> {
        Ok(VmFilters { vcpu: vcpu()?.run_as(run_as), main: main_thread()?.run_as(run_as), device: device()?.run_as(run_as) })
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

    /// The device allowlist: threads yes (clone3 says ENOSYS, clone with CLONE_THREAD passes
    /// the filter), a new process or an ioctl other than FIONBIO no. (No real thread is
    /// started: the forked child of a threaded test must not allocate.)
    #[test]
    fn device_filter_allows_threads_but_not_processes_or_other_ioctls() {
        use std::os::unix::process::ExitStatusExt;
        let filter = device().expect("filter");
        let ok = filter.clone();
        let st = in_child(move || {
            if ok.apply().is_err() {
                return 2;
            }
            // SAFETY: clone3 with a null argument: the filter answers before the kernel reads it.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            if r != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return 3;
            }
            // SAFETY: FIONBIO on fd -1: EBADF, after the filter.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, libc::FIONBIO, std::ptr::null::<u8>()) };
            // clone with CLONE_THREAD passes the filter; alone (without CLONE_SIGHAND and
            // CLONE_VM) the kernel then refuses it with EINVAL, so nothing is created.
            // SAFETY: the kernel rejects these flags before creating anything.
            let r = unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_THREAD, 0, 0, 0, 0) };
            if r != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return 4;
            }
            0
        });
        assert_eq!(st.code(), Some(0), "clone3 is ENOSYS, FIONBIO and threads pass: {st:?}");
        let forks = filter.clone();
        let st = in_child(move || {
            if forks.apply().is_err() {
                return 2;
            }
            // SAFETY: a raw fork-style clone (SIGCHLD, no CLONE_THREAD); the filter kills first.
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            0
        });
        assert_eq!(st.signal(), Some(libc::SIGSYS), "a device starting a process dies: {st:?}");
        let st = in_child(move || {
            if filter.apply().is_err() {
                return 2;
            }
            // SAFETY: TIOCSTI on fd -1; the filter kills first.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, libc::TIOCSTI, 0) };
            0
        });
        assert_eq!(st.signal(), Some(libc::SIGSYS), "a device making another ioctl dies: {st:?}");
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
