//! The host side's listening sockets (hull-vmm's API and hybrid vsock, the vhost-user backends'
//! sockets, the shim's ttrpc socket): whoever connects to one drives a VM or its agent, so each
//! is owner-only (0600) from the moment anyone could reach it at its path.
//!
//! `bind(2)` creates the socket with the process umask, and binding then chmodding leaves a
//! window in which it is reachable with that mode. Setting a restrictive umask around the bind
//! does not close it: the umask is per process and these processes are multi-threaded, and the
//! virtio-fs backend (fuse-backend-rs) clears it to 0 for the guest's own file modes. So the
//! socket is bound inside a fresh directory only the owner can enter (0700), made 0600 there,
//! and renamed into place: at its path it never had another mode.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Binds a unix socket at `path` (replacing a stale one) that is 0600 from the moment it appears
/// there. The listener keeps working after the rename; nothing removes the path when it drops.
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a socket path must end in a file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = private_dir(parent)?;
    // A short name inside: the whole path must fit in sun_path (108 bytes) like `path` itself.
    let bound = private.join("s");
    let result = UnixListener::bind(&bound).and_then(|listener| {
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o600))?;
        // rename(2) replaces a stale socket atomically.
        std::fs::rename(&bound, parent.join(name))?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&bound);
    let _ = std::fs::remove_dir(&private);
    result
}

/// A new owner-only directory in `parent`, named by this process and a counter (kept short for
/// sun_path); a leftover of an earlier process with this pid is skipped, never reused.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let dir = parent.join(format!(".{:x}.{:x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    /// The inotify events of one directory, as (mask, name).
    struct DirEvents(std::fs::File);

    impl DirEvents {
        fn watch(dir: &Path) -> DirEvents {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::io::FromRawFd;
            // SAFETY: inotify_init1 takes no pointers; the fd it returns is owned by the File below.
            let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            assert!(fd >= 0, "inotify_init1: {}", io::Error::last_os_error());
            let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: fd is the inotify instance above; c is a NUL-terminated path that outlives the call.
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB) };
            assert!(wd >= 0, "inotify_add_watch: {}", io::Error::last_os_error());
            // SAFETY: fd is a fresh descriptor nothing else owns.
            DirEvents(unsafe { std::fs::File::from_raw_fd(fd) })
        }

        fn read(&mut self) -> Vec<(u32, String)> {
            use std::io::Read;
            let mut buf = vec![0u8; 64 * 1024];
            let n = self.0.read(&mut buf).unwrap_or(0);
            let mut events = Vec::new();
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n {
                // SAFETY: the kernel wrote a whole inotify_event at `at` (n bytes were read); read_unaligned copes with the Vec's alignment.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + header..at + header + ev.len as usize];
                let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_string();
                events.push((ev.mask, name));
                at += header + ev.len as usize;
            }
            events
        }
    }

    #[test]
    fn a_socket_appears_at_its_path_owner_only_and_is_never_created_there() {
        let dir = std::env::temp_dir().join(format!("hull-host-socket-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("api.sock");
        // A stale socket of an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let mut events = DirEvents::watch(&dir);

        let listener = bind_owner_only(&path).unwrap();

        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let events = events.read();
        // Bind-then-chmod shows up here as the socket's IN_CREATE followed by an IN_ATTRIB: the
        // window in which it had the umask's mode at its path.
        assert!(!events.iter().any(|(mask, name)| name == "api.sock" && mask & (libc::IN_CREATE | libc::IN_ATTRIB) != 0), "{events:?}");
        assert!(events.iter().any(|(mask, name)| name == "api.sock" && mask & libc::IN_MOVED_TO != 0), "{events:?}");
        // The private directory was created owner-only and is gone.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only the socket is left");

        // The renamed socket still serves its path.
        use std::io::{Read, Write};
        let mut client = UnixStream::connect(&path).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        served.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        assert_eq!(bind_owner_only(Path::new("/")).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
