//! Device wiring: which device of the configuration goes where, on which IRQ, announced how.
//! One `attach_*` per device turns its config into the device; the device logic itself lives
//! in `devices/` and knows nothing of this. Adding a device is its file under `devices/` plus
//! one `attach_*` here (and its line in `attach_virtio_devices`).
//!
//! The legacy devices sit on the port bus at the PC's addresses. Virtio devices sit on
//! virtio-mmio: one page each from the start of the MMIO gap, one free legacy IRQ each, and a
//! `virtio_mmio.device=` word on the kernel command line for each (there is no bus to probe).

use std::io::Write;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;
use crate::config::{Devices, DiskConfig, NicConfig, ShareConfig, ShareServer, TapSource, VsockConfig};
use crate::devices::bus::BusError;
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::legacy::serial::{SavedSerial, SerialConsole, COM1_BASE, COM1_IRQ};
use crate::devices::legacy::PioBus;
use crate::devices::virtio::{self, InterruptLine, MmioTransport, VirtioDevice};
use crate::devices::MmioBus;
use crate::vhost_user::{DeviceFace, FrontendDevice, FrontendError};
use crate::vstate::vm::Vm;

/// The legacy IRQs virtio-mmio devices get: the PIC's lines no device of this machine uses
/// (0 timer, 1 keyboard, 2 cascade, 4 COM1, 8 RTC are taken or reserved).
const VIRTIO_IRQS: [u32; 9] = [5, 6, 7, 9, 10, 11, 12, 14, 15];

/// Why a device could not be attached. Each variant keeps the error underneath as its source.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("Cannot set up the {what}: {source}.")]
    LegacyEventFd { what: &'static str, source: std::io::Error },
    #[error("Cannot set up the {what}: {source}.")]
    LegacyIrqfd { what: &'static str, source: kvm_ioctls::Error },
    #[error("Cannot set up the {what}: {source}.")]
    LegacyBus { what: &'static str, source: BusError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Block { name: String, source: virtio::block::BlockError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Net { name: String, source: virtio::net::NetError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Vsock { name: String, source: virtio::vsock::VsockError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Fs { name: String, source: virtio::fs::FsError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Pmem { name: String, source: virtio::pmem::PmemError },
    #[error("Cannot set up the virtio device {name}: {source}")]
    PmemSlot { name: String, source: crate::vstate::vm::VmError },
    #[error("Cannot set up the virtio device {name}: {source}")]
    VhostUser { name: String, source: FrontendError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    EventFd { name: String, source: std::io::Error },
    #[error("Cannot set up the virtio device {name}: irqfd: {source}.")]
    Irqfd { name: String, source: kvm_ioctls::Error },
    #[error("Cannot set up the virtio device {name}: ioeventfd: {source}.")]
    Ioeventfd { name: String, source: kvm_ioctls::Error },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Transport { name: String, source: virtio::mmio::MmioError },
    #[error("Cannot set up the virtio device {name}: {source}.")]
    Bus { name: String, source: BusError },
    #[error("Cannot restore the serial console's state: {source}.")]
    SerialState { source: vm_superio::serial::Error<std::io::Error> },
    #[error("A VM can have at most {max} virtio devices; {asked} were asked for.")]
    TooManyDevices { asked: usize, max: usize },
}

/// The legacy devices on the port bus: COM1 (its output to `console`; its UART the saved one
/// of a restored VM) and the i8042. Returns COM1, which a snapshot saves.
pub fn attach_legacy_devices(vm: &Vm, pio: &mut PioBus, console: Box<dyn Write + Send>, saved: Option<&SavedSerial>) -> Result<Arc<Mutex<SerialConsole>>, AttachError> {
    let com1 = attach_serial(vm, pio, console, saved)?;
    attach_i8042(pio)?;
    Ok(com1)
}

/// COM1, its interrupt an irqfd KVM injects as IRQ 4.
pub fn attach_serial(vm: &Vm, pio: &mut PioBus, console: Box<dyn Write + Send>, saved: Option<&SavedSerial>) -> Result<Arc<Mutex<SerialConsole>>, AttachError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| AttachError::LegacyEventFd { what: "serial interrupt", source })?;
    vm.fd.register_irqfd(&irq, COM1_IRQ).map_err(|source| AttachError::LegacyIrqfd { what: "serial interrupt", source })?;
    let serial = match saved {
        Some(saved) => SerialConsole::restored(irq, console, saved).map_err(|source| AttachError::SerialState { source })?,
        None => SerialConsole::new(irq, console),
    };
    let com1 = Arc::new(Mutex::new(serial));
    pio.insert(COM1_BASE.into(), 8, com1.clone()).map_err(|source| AttachError::LegacyBus { what: "serial console", source })?;
    Ok(com1)
}

/// The i8042, whose reset line is how the guest reboots.
pub fn attach_i8042(pio: &mut PioBus) -> Result<(), AttachError> {
    pio.insert(I8042_BASE.into(), I8042_LEN.into(), Arc::new(Mutex::new(I8042::default())))
        .map_err(|source| AttachError::LegacyBus { what: "i8042", source })
}

/// Creates the virtio devices of `devices` in the order the guest sees them (disks, NICs,
/// vsock, shares, rng, balloon), puts each on the MMIO bus with its irqfd and ioeventfds, and returns
/// the command-line words that announce them. Device workers install `seccomp` on themselves.
pub fn attach_virtio_devices(vm: &Vm, devices: &Devices, mmio: &mut MmioBus, seccomp: Option<&crate::seccomp::Filter>) -> Result<Vec<String>, AttachError> {
    let mut pending = PendingVirtio::default();
    for (index, disk) in devices.disks.iter().enumerate() {
        attach_block(&mut pending, index, disk)?;
    }
    for (index, nic) in devices.nics.iter().enumerate() {
        attach_net(&mut pending, index, nic)?;
    }
    if let Some(vsock) = &devices.vsock {
        attach_vsock(&mut pending, vsock)?;
    }
    for share in &devices.shares {
        attach_fs(&mut pending, share, &vm.memory)?;
    }
    if devices.rng {
        attach_rng(&mut pending);
    }
    if devices.free_page_reporting {
        attach_balloon(&mut pending);
    }
    if let Some(image) = &devices.pmem {
        attach_pmem(vm, &mut pending, image)?;
    }
    pending.onto_mmio(vm, mmio, seccomp)
}

/// virtio-blk `block<index>` on the disk image.
pub fn attach_block(pending: &mut PendingVirtio, index: usize, disk: &DiskConfig) -> Result<(), AttachError> {
    let name = format!("block{index}");
    let device = virtio::block::BlockDevice::open(&disk.path, disk.read_only, &disk.id).map_err(|source| AttachError::Block { name: name.clone(), source })?;
    pending.add(name, device);
    Ok(())
}

/// virtio-net `net<index>` on its tap.
pub fn attach_net(pending: &mut PendingVirtio, index: usize, nic: &NicConfig) -> Result<(), AttachError> {
    let name = format!("net{index}");
    let tap = match &nic.tap {
        TapSource::Name(t) => Some(virtio::net::Tap::open(t)),
        // SAFETY: the configuration says this process owns the fd (CLI `--net fd=N`).
        TapSource::Fd(fd) => Some(unsafe { virtio::net::Tap::from_raw_fd(*fd) }),
        TapSource::None => None,
    }
    .transpose()
    .map_err(|source| AttachError::Net { name: name.clone(), source })?;
    pending.add(name, virtio::net::NetDevice::new(tap, nic.mac));
    Ok(())
}

/// virtio-vsock with its hybrid host side on the configured unix socket.
pub fn attach_vsock(pending: &mut PendingVirtio, vsock: &VsockConfig) -> Result<(), AttachError> {
    let name = "vsock".to_string();
    let device = virtio::vsock::VsockDevice::new(vsock.guest_cid, &vsock.uds).map_err(|source| AttachError::Vsock { name: name.clone(), source })?;
    pending.add(name, device);
    Ok(())
}

/// virtio-fs `fs-<tag>`: the directory served in process, or a vhost-user fs backend that
/// serves it, given guest memory `mem`.
pub fn attach_fs(pending: &mut PendingVirtio, share: &ShareConfig, mem: &GuestMemoryMmap) -> Result<(), AttachError> {
    let name = format!("fs-{}", share.tag);
    let fs_err = |source| AttachError::Fs { name: name.clone(), source };
    match &share.server {
        ShareServer::InProcess(dir) => {
            let device = virtio::fs::FsDevice::new(dir, &share.tag).map_err(fs_err)?;
            pending.add_file_server(name, device);
        }
        ShareServer::VhostUser(socket) => {
            let face = DeviceFace { device_type: VIRTIO_ID_FS, queue_max_sizes: vec![virtio::fs::QUEUE_SIZE; virtio::fs::NUM_QUEUES], config: virtio::fs::config_space(&share.tag).map_err(fs_err)?.to_vec() };
            let device = FrontendDevice::connect(socket, face, mem).map_err(|source| AttachError::VhostUser { name: name.clone(), source })?;
            pending.add(name, device);
        }
    }
    Ok(())
}

/// virtio-rng.
pub fn attach_rng(pending: &mut PendingVirtio) {
    pending.add("rng".into(), virtio::rng::RngDevice::default());
}

/// virtio-balloon, taking the guest's free page reports only.
pub fn attach_balloon(pending: &mut PendingVirtio) {
    pending.add("balloon".into(), virtio::balloon::BalloonDevice::default());
}

/// virtio-pmem on a read-only image, mapped into guest physical memory above RAM.
pub fn attach_pmem(vm: &Vm, pending: &mut PendingVirtio, image: &std::path::Path) -> Result<(), AttachError> {
    let name = "pmem".to_string();
    let mapping = virtio::pmem::ImageMapping::open(image).map_err(|source| AttachError::Pmem { name: name.clone(), source })?;
    let ram: u64 = vm.memory.iter().map(|r| r.len()).sum();
    let start = crate::arch::x86_64::device_memory_start(ram);
    vm.map_read_only(start, &mapping).map_err(|source| AttachError::PmemSlot { name: name.clone(), source })?;
    tracing::debug!(start = format_args!("{start:#x}"), bytes = mapping.len(), "virtio-pmem image mapped read-only");
    pending.add(name, virtio::pmem::PmemDevice::new(start, mapping));
    Ok(())
}

/// Virtio devices created from the configuration but not yet on the MMIO bus, in the order the
/// guest enumerates them. Every device is created before any is wired, so that a VM with too
/// many devices fails before a single device worker has started.
#[derive(Default)]
pub struct PendingVirtio {
    devices: Vec<PendingDevice>,
}

struct PendingDevice {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// Its worker keeps the process's privileges (see `PendingVirtio::add_file_server`).
    file_server: bool,
}

impl PendingVirtio {
    pub fn add(&mut self, name: String, device: impl VirtioDevice + 'static) {
        self.devices.push(PendingDevice { name, device: Arc::new(Mutex::new(device)), file_server: false });
    }

    /// A device whose worker acts as the guest's file owners (virtio-fs): the one thread that
    /// keeps uid 0 and the file server's capabilities when the others give them up.
    pub fn add_file_server(&mut self, name: String, device: impl VirtioDevice + 'static) {
        self.devices.push(PendingDevice { name, device: Arc::new(Mutex::new(device)), file_server: true });
    }

    /// Puts each device on the MMIO bus (its transport, irqfd and ioeventfds) and returns the
    /// command-line words that announce them.
    fn onto_mmio(self, vm: &Vm, bus: &mut MmioBus, seccomp: Option<&crate::seccomp::Filter>) -> Result<Vec<String>, AttachError> {
        if self.devices.len() > VIRTIO_IRQS.len() {
            return Err(AttachError::TooManyDevices { asked: self.devices.len(), max: VIRTIO_IRQS.len() });
        }
        let mut words = Vec::new();
        for (i, PendingDevice { name, device, file_server }) in self.devices.into_iter().enumerate() {
            let base = layout::MMIO_GAP_START + i as u64 * virtio::mmio::MMIO_LEN;
            let irq = VIRTIO_IRQS[i];
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| AttachError::EventFd { name: name.clone(), source })?;
            vm.fd.register_irqfd(&irqfd, irq).map_err(|source| AttachError::Irqfd { name: name.clone(), source })?;
            let filter = seccomp.map(|f| if file_server { f.keeping_privileges() } else { f.clone() });
            let transport = MmioTransport::new(&name, device, vm.memory.clone(), InterruptLine::new(irqfd), filter)
                .map_err(|source| AttachError::Transport { name: name.clone(), source })?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                let addr = kvm_ioctls::IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
                vm.fd.register_ioevent(evt, &addr, q as u32).map_err(|source| AttachError::Ioeventfd { name: name.clone(), source })?;
            }
            bus.insert(base, virtio::mmio::MMIO_LEN, Arc::new(Mutex::new(transport))).map_err(|source| AttachError::Bus { name: name.clone(), source })?;
            tracing::debug!(device = %name, base = format_args!("{base:#x}"), irq, "virtio-mmio device");
            words.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        }
        Ok(words)
    }
}
