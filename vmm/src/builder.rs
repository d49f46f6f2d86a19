//! Builds a microVM from a kernel, an initramfs and a command line, and runs it to its end:
//! guest memory, KVM VM, kernel (ELF vmlinux through its 64-bit entry, or bzImage), zero page,
//! the legacy devices on the port bus, virtio devices on virtio-mmio (announced on the command
//! line), one thread per vCPU.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{self as arch, layout};
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::legacy::serial::{SerialConsole, COM1_BASE, COM1_IRQ};
use crate::devices::legacy::PioBus;
use crate::devices::virtio::{self, InterruptLine, MmioTransport, VirtioDevice};
use crate::devices::MmioBus;
use crate::vstate::control::{RunState, VcpuControl};
use crate::vstate::vcpu::{Vcpu, VcpuError, VmExit};
use crate::vstate::vm::{Vm, VmError};

/// What the guest kernel needs on a machine with only these devices: the console on COM1, no
/// PCI probing, no ACPI (hull-vmm describes the machine with an MP table; hull's guest kernel
/// has ACPI for QEMU's pc machine), the i8042 without its keyboard and mouse probes.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off acpi=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// What a guest kernel needs on a host whose /dev/kvm is kvm_pvm (a nested paravirtual
/// hypervisor that emulates guest ring 0): features its instruction emulator lacks are hidden,
/// and KPTI is off for the guest kernel's syscall-entry workaround (guest-image/patches/).
pub const PVM_COMPAT_CMDLINE: &str = "noxsave nopti clearcpuid=popcnt,cx16,umip,smap,smep,avx,avx2,avx512f,movbe,bmi1,bmi2,fsgsbase,rdpid,erms,fsrm";

/// Whether this host's /dev/kvm is kvm_pvm.
pub fn host_kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Where COM1's output goes.
    pub console: Box<dyn Write + Send>,
    pub devices: Devices,
    /// Install seccomp filters on the vCPU and device threads (off only for debugging).
    pub seccomp: bool,
}

/// The virtio devices of a VM. The guest sees disks first (vda, vdb, ... in this order), then
/// vsock, the shares and rng.
#[derive(Debug, Default, Clone)]
pub struct Devices {
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    pub vsock: Option<VsockConfig>,
    pub shares: Vec<ShareConfig>,
    pub rng: bool,
}

#[derive(Debug, Clone)]
pub struct NicConfig {
    pub tap: TapSource,
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
}

#[derive(Debug, Clone)]
pub enum TapSource {
    /// Opened (created if missing) by name.
    Name(String),
    /// An open tap fd this process owns (the shim hands it over as a child's fd).
    Fd(i32),
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What GET_ID answers (/sys/block/vdX/serial), at most 20 bytes.
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The hybrid vsock's host socket (`CONNECT <port>`; guest connections go to `<uds>_<port>`).
    pub uds: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub tag: String,
    pub dir: PathBuf,
}

/// The legacy IRQs virtio-mmio devices get: the PIC's lines no device of this machine uses
/// (0 timer, 1 keyboard, 2 cascade, 4 COM1, 8 RTC are taken or reserved).
const VIRTIO_IRQS: [u32; 9] = [5, 6, 7, 9, 10, 11, 12, 14, 15];

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("A VM needs 1 to 254 vCPUs, not {0}.")]
    Vcpus(u8),
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("Cannot read {what} {path:?}: {source}.")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("Cannot load the kernel {path:?}: {reason}.")]
    Kernel { path: PathBuf, reason: String },
    #[error("The kernel command line is not valid: {0}.")]
    Cmdline(String),
    #[error("Cannot load the initramfs into guest memory: {0}.")]
    Initramfs(String),
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error(transparent)]
    MpTable(#[from] arch::mptable::MpTableError),
    #[error("Cannot set up the {what}: {reason}.")]
    Device { what: &'static str, reason: String },
    #[error("Cannot set up the virtio device {name}: {reason}.")]
    Virtio { name: String, reason: String },
    #[error("A VM can have at most {max} virtio devices; {asked} were asked for.")]
    TooManyDevices { asked: usize, max: usize },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("Cannot start a vCPU thread: {0}.")]
    Thread(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// The signal that kicks a vCPU thread out of KVM_RUN so that it sees the stop flag.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Loads the kernel; returns the 64-bit entry and the bzImage setup header if there is one.
fn load_kernel(vm: &Vm, path: &PathBuf) -> Result<(GuestAddress, Option<linux_loader::loader::bootparam::setup_header>, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Read { what: "the kernel", path: path.clone(), source })?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(|source| BootError::Read { what: "the kernel", path: path.clone(), source })?;
    file.seek(SeekFrom::Start(0)).map_err(|source| BootError::Read { what: "the kernel", path: path.clone(), source })?;
    let err = |e: linux_loader::loader::Error| BootError::Kernel { path: path.clone(), reason: e.to_string() };
    if magic == *b"\x7fELF" {
        let r = Elf::load(&vm.memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(err)?;
        Ok((r.kernel_load, None, r.kernel_end))
    } else {
        let r = BzImage::load(&vm.memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(err)?;
        // startup_64 sits 0x200 into the protected-mode kernel.
        Ok((GuestAddress(r.kernel_load.0 + 0x200), r.setup_header, r.kernel_end))
    }
}

/// Creates the virtio devices, puts each on the MMIO bus with its irqfd and ioeventfds, and
/// returns the command-line words that announce them.
fn attach_virtio(vm: &Vm, devices: &Devices, bus: &mut MmioBus, seccomp: Option<&crate::seccomp::Filter>) -> Result<Vec<String>, BootError> {
    let err = |name: &str| {
        let name = name.to_string();
        move |reason: String| BootError::Virtio { name: name.clone(), reason }
    };
    let mut list: Vec<(String, Arc<Mutex<dyn VirtioDevice>>)> = Vec::new();
    for (i, d) in devices.disks.iter().enumerate() {
        let name = format!("block{i}");
        let dev = virtio::block::BlockDevice::open(&d.path, d.read_only, &d.id).map_err(|e| err(&name)(e.to_string()))?;
        list.push((name, Arc::new(Mutex::new(dev))));
    }
    for (i, n) in devices.nics.iter().enumerate() {
        let name = format!("net{i}");
        let tap = match &n.tap {
            TapSource::Name(t) => virtio::net::Tap::open(t),
            // SAFETY: the configuration says this process owns the fd (CLI `--net fd=N`).
            TapSource::Fd(fd) => unsafe { virtio::net::Tap::from_raw_fd(*fd) },
        }
        .map_err(|e| err(&name)(e.to_string()))?;
        list.push((name, Arc::new(Mutex::new(virtio::net::NetDevice::new(tap, n.mac)))));
    }
    if let Some(v) = &devices.vsock {
        let dev = virtio::vsock::VsockDevice::new(v.guest_cid, &v.uds).map_err(|e| err("vsock")(e.to_string()))?;
        list.push(("vsock".into(), Arc::new(Mutex::new(dev))));
    }
    for s in &devices.shares {
        let name = format!("fs-{}", s.tag);
        let dev = virtio::fs::FsDevice::new(&s.dir, &s.tag).map_err(|e| err(&name)(e.to_string()))?;
        list.push((name, Arc::new(Mutex::new(dev))));
    }
    if devices.rng {
        list.push(("rng".into(), Arc::new(Mutex::new(virtio::rng::RngDevice::default()))));
    }
    if list.len() > VIRTIO_IRQS.len() {
        return Err(BootError::TooManyDevices { asked: list.len(), max: VIRTIO_IRQS.len() });
    }
    let mut words = Vec::new();
    for (i, (name, device)) in list.into_iter().enumerate() {
        let base = layout::MMIO_GAP_START + i as u64 * virtio::mmio::MMIO_LEN;
        let irq = VIRTIO_IRQS[i];
        let e = err(&name);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|x| e(x.to_string()))?;
        vm.fd.register_irqfd(&irqfd, irq).map_err(|x| e(format!("irqfd: {x}")))?;
        let transport = MmioTransport::new(&name, device, vm.memory.clone(), InterruptLine::new(irqfd), seccomp.cloned()).map_err(|x| e(x.to_string()))?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            let addr = kvm_ioctls::IoEventAddress::Mmio(base + virtio::mmio::regs::QUEUE_NOTIFY);
            vm.fd.register_ioevent(evt, &addr, q as u32).map_err(|x| e(format!("ioeventfd: {x}")))?;
        }
        bus.insert(base, virtio::mmio::MMIO_LEN, Arc::new(Mutex::new(transport))).map_err(|x| e(x.to_string()))?;
        tracing::debug!(device = %name, base = format_args!("{base:#x}"), irq, "virtio-mmio device");
        words.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    Ok(words)
}

/// Boots the VM and runs it until the guest resets or powers off, or a vCPU fails.
pub fn run(config: VmConfig) -> Result<VmExit, BootError> {
    start(config)?.wait()
}

/// A running VM: its vCPU threads, and what pauses and stops them.
pub struct RunningVm {
    started: Instant,
    control: Arc<VcpuControl>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pthreads: Arc<Vec<libc::pthread_t>>,
    results: mpsc::Receiver<Result<VmExit, VcpuError>>,
    wake: mpsc::Sender<Result<VmExit, VcpuError>>,
    /// Dropped after the vCPUs: devices and memory outlive every vCPU thread.
    vm: Option<Vm>,
    _mmio: Arc<MmioBus>,
}

impl RunningVm {
    /// A handle that pauses, resumes and stops the VM from other threads.
    pub fn controller(&self) -> Controller {
        Controller { control: self.control.clone(), pthreads: self.pthreads.clone(), wake: self.wake.clone() }
    }

    /// Waits until the guest ends the VM (or `Controller::stop`), stops every vCPU, and says
    /// how it ended.
    pub fn wait(mut self) -> Result<VmExit, BootError> {
        // The first vCPU to end the VM decides how it ended; the others are stopped.
        let result = self.results.recv().unwrap_or(Ok(VmExit::Stopped));
        {
            // From here on no controller kicks a thread: they may be joined.
            let mut g = self.control.lock();
            self.control.set(&mut g, RunState::Ended);
        }
        for t in &self.threads {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        drop(self.vm.take());
        let ran_ms = self.started.elapsed().as_millis() as u64;
        match &result {
            Ok(exit) => tracing::info!(?exit, ran_ms, "VM ended"),
            Err(e) => tracing::error!(error = %e, ran_ms, "VM failed"),
        }
        Ok(result?)
    }
}

/// Pauses, resumes or ends a running VM from outside.
#[derive(Clone)]
pub struct Controller {
    control: Arc<VcpuControl>,
    pthreads: Arc<Vec<libc::pthread_t>>,
    wake: mpsc::Sender<Result<VmExit, VcpuError>>,
}

impl Controller {
    pub fn state(&self) -> RunState {
        *self.control.lock()
    }

    /// Stops the vCPUs where they are; the devices keep serving what is in flight. Returns
    /// the state before.
    pub fn pause(&self) -> RunState {
        let mut g = self.control.lock();
        let before = *g;
        if before == RunState::Running {
            self.control.set(&mut g, RunState::Paused);
            // Under the lock: `wait` cannot have joined the threads while the state is not
            // Ended.
            for &t in self.pthreads.iter() {
                // SAFETY: `t` is a vCPU thread that has not been joined (the state is not
                // Ended), so its pthread_t is valid; the kick signal has a no-op handler.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            tracing::info!("VM paused");
        }
        before
    }

    pub fn resume(&self) -> RunState {
        let mut g = self.control.lock();
        let before = *g;
        if before == RunState::Paused {
            self.control.set(&mut g, RunState::Running);
            tracing::info!("VM resumed");
        }
        before
    }

    /// Ends the VM: its `wait` returns `VmExit::Stopped`.
    pub fn stop(&self) {
        // `wait` takes this as the VM's end and kicks the vCPUs out of KVM_RUN itself.
        let _ = self.wake.send(Ok(VmExit::Stopped));
    }
}

/// Builds the VM and starts its vCPUs.
pub fn start(config: VmConfig) -> Result<RunningVm, BootError> {
    let started = Instant::now();
    if config.vcpus == 0 || config.vcpus == 255 {
        return Err(BootError::Vcpus(config.vcpus));
    }
    let filters = if config.seccomp { Some(crate::seccomp::VmFilters::new()?) } else { None };
    let memory = crate::vstate::memory::create(config.memory_mib)?;
    let vm = Vm::new(memory)?;

    let (entry, setup_header, kernel_end) = load_kernel(&vm, &config.kernel)?;
    let mut mmio = MmioBus::default();
    let announce = attach_virtio(&vm, &config.devices, &mut mmio, filters.as_ref().map(|f| &f.device))?;
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(&config.cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for word in &announce {
        cmdline.insert_str(word).map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    load_cmdline(&vm.memory, GuestAddress(layout::CMDLINE_START), &cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes_with_nul().len()).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let initramfs = match &config.initramfs {
        Some(path) => {
            let read_err = |source| BootError::Read { what: "the initramfs", path: path.clone(), source };
            let mut file = File::open(path).map_err(read_err)?;
            let size = file.metadata().map_err(read_err)?.len();
            let addr = arch::initramfs_address(&vm.memory, size, kernel_end)?;
            vm.memory.read_exact_volatile_from(addr, &mut file, size as usize).map_err(|e| BootError::Initramfs(e.to_string()))?;
            Some((addr, size))
        }
        None => None,
    };
    arch::configure_system(&vm.memory, setup_header, cmdline_len, initramfs)?;
    arch::mptable::setup(&vm.memory, config.vcpus)?;

    let mut bus = PioBus::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BootError::Device { what: "serial interrupt", reason: e.to_string() })?;
    vm.fd.register_irqfd(&irq, COM1_IRQ).map_err(|e| BootError::Device { what: "serial interrupt", reason: e.to_string() })?;
    let device = |what| move |e: crate::devices::legacy::bus::BusError| BootError::Device { what, reason: e.to_string() };
    bus.insert(COM1_BASE, 8, Arc::new(Mutex::new(SerialConsole::new(irq, config.console))))
        .map_err(device("serial console"))?;
    bus.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::default()))).map_err(device("i8042"))?;
    let bus = Arc::new(bus);
    let mmio = Arc::new(mmio);

    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id)?;
        vcpu.configure(&vm, entry, config.vcpus)?;
        vcpus.push(vcpu);
    }
    register_signal_handler(kick_signal(), on_kick).map_err(|e| BootError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
    let control = Arc::new(VcpuControl::default());
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    for mut vcpu in vcpus {
        let (bus, mmio, control, tx) = (bus.clone(), mmio.clone(), control.clone(), tx.clone());
        let filter = filters.as_ref().map(|f| f.vcpu.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || {
                if let Some(Err(e)) = filter.map(|f| f.apply()) {
                    let _ = tx.send(Err(VcpuError::Seccomp { id: vcpu.id, reason: e.to_string() }));
                    return;
                }
                let r = vcpu.run(&bus, &mmio, &control);
                let _ = tx.send(r);
            })
            .map_err(BootError::Thread)?;
        threads.push(thread);
    }
    tracing::info!(vcpus = config.vcpus, memory_mib = config.memory_mib, virtio_devices = announce.len(), seccomp = config.seccomp, setup_ms = started.elapsed().as_millis() as u64, "VM running");
    let pthreads = Arc::new(threads.iter().map(|t| std::os::unix::thread::JoinHandleExt::as_pthread_t(t) as libc::pthread_t).collect());
    Ok(RunningVm { started, control, threads, pthreads, results: rx, wake: tx, vm: Some(vm), _mmio: mmio })
}
