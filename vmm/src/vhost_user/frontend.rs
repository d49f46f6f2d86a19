//! A virtio device whose queues another process serves: the VMM keeps the transport (the
//! registers, the config space, the interrupt) and hands a vhost-user backend guest memory (the
//! memfd), each queue's rings, its kick (the queue's ioeventfd, which KVM signals) and a call
//! eventfd, which the device's worker turns into the virtio-mmio interrupt. The builtin engine
//! serves virtio-fs this way: the uid-0 file server runs in a jail of its own, apart from the
//! memory of the VMM, which runs unprivileged (QEMU's `vhost-user-fs-pci` is the model).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{DeviceEvent, VirtioDevice};

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("Cannot connect to the vhost-user backend at {socket:?}: {source}.")]
    Connect { socket: PathBuf, source: vhost::Error },
    #[error("The vhost-user backend at {socket:?} failed {step}: {source}.")]
    Handshake { socket: PathBuf, step: &'static str, source: vhost::Error },
    #[error("The vhost-user backend at {0:?} does not offer vhost-user protocol features, which hull needs to enable its queues.")]
    NoProtocolFeatures(PathBuf),
    #[error("Cannot create a call eventfd: {0}.")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot set the vhost-user socket's timeouts: {0}.")]
    Socket(#[source] std::io::Error),
}

/// How long a message to the backend, or its reply, may take.
const REPLY_TIMEOUT_SECS: libc::time_t = 5;

/// What the guest sees of the device; the backend serves only its queues.
pub struct DeviceFace {
    pub device_type: u32,
    pub queue_max_sizes: Vec<u16>,
    pub config: Vec<u8>,
}

pub struct FrontendDevice {
    frontend: Frontend,
    socket: PathBuf,
    face: DeviceFace,
    /// The backend's virtio features, without the vhost-user protocol bit.
    features: u64,
    /// One per queue: the backend signals it when it used buffers.
    calls: Vec<EventFd>,
    /// The queues handed to the backend, taken back on reset.
    started: Vec<usize>,
}

impl FrontendDevice {
    /// Connects to the backend at `socket` and gives it `mem`, which must be file-backed (see
    /// `vstate::memory`). Runs before the VMM's seccomp filters (it connects a socket).
    pub fn connect(socket: &Path, face: DeviceFace, mem: &GuestMemoryMmap) -> Result<FrontendDevice, FrontendError> {
        let step_err = |step| move |source| FrontendError::Handshake { socket: socket.into(), step, source };
        let mut frontend = Frontend::connect(socket, face.queue_max_sizes.len() as u64).map_err(|source| FrontendError::Connect { socket: socket.into(), source })?;
        // A backend that stops answering fails the request that waits on it (the device then
        // needs a reset) instead of holding the vCPU that wrote DRIVER_OK, or a reset, forever.
        let timeout = libc::timeval { tv_sec: REPLY_TIMEOUT_SECS, tv_usec: 0 };
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: setsockopt on the frontend's own socket, reading a timeval that lives
            // across the call, with its size.
            let r = unsafe { libc::setsockopt(frontend.as_raw_fd(), libc::SOL_SOCKET, option, (&timeout as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as libc::socklen_t) };
            if r != 0 {
                return Err(FrontendError::Socket(std::io::Error::last_os_error()));
            }
        }
        frontend.set_owner().map_err(step_err("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(step_err("GET_FEATURES"))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol == 0 {
            return Err(FrontendError::NoProtocolFeatures(socket.into()));
        }
        // None of the optional protocol features is needed: the config space is the VMM's, the
        // queue count fixed, and no reply is awaited beyond what the protocol requires.
        frontend.get_protocol_features().map_err(step_err("GET_PROTOCOL_FEATURES"))?;
        frontend.set_protocol_features(VhostUserProtocolFeatures::empty()).map_err(step_err("SET_PROTOCOL_FEATURES"))?;
        let regions = mem.iter().map(VhostUserMemoryRegionInfo::from_guest_region).collect::<Result<Vec<_>, _>>().map_err(step_err("SET_MEM_TABLE (guest memory is not file-backed)"))?;
        frontend.set_mem_table(&regions).map_err(step_err("SET_MEM_TABLE"))?;
        let calls = face.queue_max_sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>().map_err(FrontendError::EventFd)?;
        tracing::info!(socket = ?socket, features = offered, "vhost-user backend connected");
        Ok(FrontendDevice { frontend, socket: socket.into(), face, features: offered & !protocol, calls, started: Vec::new() })
    }

    /// Hands queue `index` to the backend: its size, its rings (as addresses in this process,
    /// which the backend translates through the memory table), its kick and call, enabled.
    fn start_queue(&mut self, index: usize, queue: &Queue, kick: &EventFd, mem: &GuestMemoryMmap) -> Result<(), vhost::Error> {
        let host = |addr: u64| mem.get_host_address(GuestAddress(addr)).map(|p| p as u64).map_err(|_| vhost::Error::InvalidGuestMemory);
        let rings = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: host(queue.desc_table())?,
            used_ring_addr: host(queue.used_ring())?,
            avail_ring_addr: host(queue.avail_ring())?,
            log_addr: None,
        };
        self.frontend.set_vring_num(index, queue.size())?;
        self.frontend.set_vring_addr(index, &rings)?;
        self.frontend.set_vring_base(index, queue.next_avail())?;
        self.frontend.set_vring_call(index, &self.calls[index])?;
        self.frontend.set_vring_kick(index, kick)?;
        self.frontend.set_vring_enable(index, true)
    }
}

impl VirtioDevice for FrontendDevice {
    fn device_type(&self) -> u32 {
        self.face.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.face.queue_max_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.face.config, offset, data);
    }

    /// The calls, in queue order.
    fn host_fds(&self) -> Vec<RawFd> {
        self.calls.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// A call is the backend's "buffers used": the worker raises the queue interrupt.
    fn process(&mut self, event: DeviceEvent, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        match event {
            DeviceEvent::Host(i) => self.calls.get(i).is_some_and(|call| call.read().is_ok()),
            DeviceEvent::Queue(_) => false,
        }
    }

    fn queues_served_elsewhere(&self) -> bool {
        true
    }

    fn activate(&mut self, features: u64, queues: &[Queue], kicks: &[EventFd], mem: &GuestMemoryMmap) -> std::io::Result<()> {
        let socket = self.socket.clone();
        let fail = |step: &'static str| {
            let socket = socket.clone();
            move |source| std::io::Error::other(FrontendError::Handshake { socket, step, source })
        };
        self.frontend.set_features(features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).map_err(fail("SET_FEATURES"))?;
        for (index, (queue, kick)) in queues.iter().zip(kicks).enumerate().filter(|(_, (q, _))| q.ready()) {
            // Recorded first: a queue the backend got part of is stopped on reset too.
            self.started.push(index);
            self.start_queue(index, queue, kick, mem).map_err(fail("to start a queue"))?;
        }
        Ok(())
    }

    /// Takes the queues back from the backend (GET_VRING_BASE stops a vring and says where the
    /// backend got to in its available ring; it has used all it took, as hull's backends
    /// answer each request before the next) for a snapshot.
    fn freeze(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> std::io::Result<()> {
        let fail = |step: &'static str, socket: &Path| {
            let socket = socket.to_path_buf();
            move |source| std::io::Error::other(FrontendError::Handshake { socket, step, source })
        };
        for &index in &self.started {
            self.frontend.set_vring_enable(index, false).map_err(fail("to stop a queue", &self.socket))?;
            let base = self.frontend.get_vring_base(index).map_err(fail("GET_VRING_BASE", &self.socket))?;
            if let Some(q) = queues.get_mut(index) {
                let used = q.used_idx(mem, std::sync::atomic::Ordering::Acquire).map_err(std::io::Error::other)?;
                q.set_next_avail(base as u16);
                q.set_next_used(used.0);
            }
        }
        Ok(())
    }

    fn thaw(&mut self, queues: &[Queue], kicks: &[EventFd], mem: &GuestMemoryMmap) -> std::io::Result<()> {
        for index in self.started.clone() {
            if let (Some(queue), Some(kick)) = (queues.get(index), kicks.get(index)) {
                self.start_queue(index, queue, kick, mem).map_err(|source| std::io::Error::other(FrontendError::Handshake { socket: self.socket.clone(), step: "to restart a queue", source }))?;
            }
        }
        Ok(())
    }

    /// Takes the queues back (GET_VRING_BASE stops a vring): from here on the backend no
    /// longer touches the rings the driver set up.
    fn reset(&mut self) {
        for index in std::mem::take(&mut self.started) {
            let stopped = self.frontend.set_vring_enable(index, false).and_then(|()| self.frontend.get_vring_base(index));
            if let Err(e) = stopped {
                tracing::error!(socket = ?self.socket, queue = index, error = %e, "vhost-user: cannot stop a queue");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::device::F_VERSION_1;
    use crate::devices::virtio::rng::RngDevice;
    use crate::devices::virtio::test_driver::TestDriver;
    use crate::vhost_user::{ConfigSpace, DeviceDaemon};

    /// hull-vmm's frontend against hull's own backend over a real socket (here a thread, in the
    /// VM a jailed process): the backend maps the memfd it is given, serves the queue the
    /// frontend hands it when the kick comes, and its call is what the frontend's worker turns
    /// into the interrupt; the backend ends when the VM goes.
    #[test]
    fn a_backend_serves_the_queue_the_frontend_hands_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("rng.sock");
        let rng = RngDevice::default();
        let face = DeviceFace { device_type: rng.device_type(), queue_max_sizes: rng.queue_max_sizes(), config: Vec::new() };
        let daemon = DeviceDaemon::new("test-rng", rng, ConfigSpace::FromFrontend).unwrap();
        let at = socket.clone();
        let server = std::thread::spawn(move || daemon.serve(&at, None));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "the backend never listened");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let mem = crate::vstate::memory::create(64).unwrap();
        let mut d = TestDriver::with_memory(mem.clone());
        let mut q = d.queue(0x10000);
        let mut device = FrontendDevice::connect(&socket, face, &mem).unwrap();
        assert_eq!(device.features() & F_VERSION_1, F_VERSION_1, "the backend's features, for the driver");
        assert!(device.queues_served_elsewhere());
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        device.activate(F_VERSION_1, std::slice::from_ref(&q.queue), std::slice::from_ref(&kick), &mem).unwrap();

        let buf = d.buffer(&[], 32);
        let head = d.post(&mut q, &[(buf, 32, true)]);
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !device.process(DeviceEvent::Host(0), &mut [], &mem) {
            assert!(std::time::Instant::now() < deadline, "no call from the backend");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(d.take_used(&mut q), vec![(head, 32)], "the backend filled the buffer through the memfd");
        assert_ne!(d.read(buf, 32), vec![0; 32]);

        // A snapshot: the backend gives the queue back with where it got to (one request), and
        // serves it again from there after the thaw.
        let mut queues = [Queue::try_from(q.queue.state()).unwrap()];
        device.freeze(&mut queues, &mem).unwrap();
        assert_eq!((queues[0].next_avail(), queues[0].next_used()), (1, 1), "the backend took and used one buffer");
        device.thaw(&queues, std::slice::from_ref(&kick), &mem).unwrap();
        let buf = d.buffer(&[], 16);
        let head = d.post(&mut q, &[(buf, 16, true)]);
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !device.process(DeviceEvent::Host(0), &mut [], &mem) {
            assert!(std::time::Instant::now() < deadline, "no call from the backend after the thaw");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(d.take_used(&mut q), vec![(head, 16)], "the thawed backend served the next buffer, not the first again");

        // Stops the queue: GET_VRING_BASE needs the backend's answer.
        device.reset();
        assert!(device.started.is_empty());
        drop(device);
        assert!(server.join().unwrap().is_ok(), "the backend ends cleanly when the VM goes");
    }
}
