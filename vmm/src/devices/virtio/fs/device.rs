//! The virtio-fs device's queue processing, shared by every transport.

use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{FsError, TAG_LEN};

pub struct FsDevice {
    server: Arc<Server<Arc<PassthroughFs>>>,
    tag: String,
    /// Requests rejected as malformed, for tests and the log.
    pub rejected: u64,
}

impl FsDevice {
    /// Shares `dir` under `tag`.
    pub fn new(dir: &Path, tag: &str) -> Result<FsDevice, FsError> {
        super::config_space(tag)?;
        if !dir.is_dir() {
            return Err(FsError::SharedDir(dir.into()));
        }
        let cfg = Config {
            root_dir: dir.to_string_lossy().into_owned(),
            // Containers' rootfs change underneath only through the guest; let the guest
            // cache what it reads (the "auto" policy: revalidate on open).
            cache_policy: CachePolicy::Auto,
            do_import: true,
            xattr: true,
            writeback: false,
            ..Default::default()
        };
        let passthrough = |source| FsError::Passthrough { dir: dir.into(), source };
        let fs = PassthroughFs::<()>::new(cfg).map_err(passthrough)?;
        fs.import().map_err(passthrough)?;
        Ok(FsDevice { server: Arc::new(Server::new(Arc::new(fs))), tag: tag.into(), rejected: 0 })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The config space of its tag (`config_space`).
    pub fn config(&self) -> [u8; TAG_LEN + 4] {
        super::config_space(&self.tag).unwrap_or([0; TAG_LEN + 4])
    }

    /// Serves every request the guest queued on `queue` (either queue: FORGETs on the
    /// high-priority one get no reply, which the server knows). Returns whether buffers were
    /// used. A request the server cannot parse is returned with nothing written and counted;
    /// the device keeps serving the others.
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match self.serve(mem, chain) {
                Ok(n) => n,
                Err(e) => {
                    self.rejected += 1;
                    tracing::warn!(error = %e, tag = %self.tag, "virtio-fs: request rejected");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written as u32) {
                tracing::error!(error = %e, tag = %self.tag, "virtio-fs: cannot return a buffer");
                return used;
            }
            used = true;
        }
        used
    }

    fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, FsError> {
        let reader = Reader::from_descriptor_chain(mem, chain.clone())?;
        let writer = VirtioFsWriter::new(mem, chain)?;
        Ok(self.server.handle_message(reader, writer.into(), None, None)?)
    }
}

impl crate::devices::virtio::device::VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![super::QUEUE_SIZE; super::NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config(), offset, data);
    }

    fn process(&mut self, event: crate::devices::virtio::device::DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match event {
            crate::devices::virtio::device::DeviceEvent::Queue(i) => match queues.get_mut(i) {
                Some(q) => self.process_queue(q, mem),
                None => false,
            },
            crate::devices::virtio::device::DeviceEvent::Host(_) => false,
        }
    }
}
