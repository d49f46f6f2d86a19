//! `containerd-shim-hull-v2 start`: finds the pod's running shim (a container joining its
//! pod) or spawns the shim daemon for a new pod, and prints its address.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use containerd_shim::Flags;

use super::{pod_id, read_bundle_spec, ShimError};

/// `start`: find or spawn the pod's shim daemon and print its address.
pub fn start(flags: &Flags) -> Result<(), ShimError> {
    let bundle = std::env::current_dir().map_err(ShimError::Spawn)?;
    let spec = read_bundle_spec(&bundle)?;
    let pod = pod_id(&spec, &flags.id)?;
    // containerd writes the runtime options (an Any) to stdin; ConfigPath travels on to the
    // daemon as HULL_CONFIG.
    let mut options = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut options);
    let config_path = crate::config::config_path_from_options(&options);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &pod);
    let socket = address.trim_start_matches("unix://").to_string();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // The pod's shim already runs: this container joins it.
        return write_address(&bundle, &address);
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(dir) = Path::new(&socket).parent() {
        std::fs::create_dir_all(dir).map_err(|source| ShimError::Write { path: dir.into(), source })?;
    }
    let exe = std::env::current_exe().map_err(ShimError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id, "-address", &flags.address])
        .args(["-publish-binary", &flags.publish_binary, "-socket", &address])
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: the daemon outlives a containerd restart.
        .process_group(0);
    if flags.debug {
        cmd.arg("-debug");
    }
    if let Some(p) = config_path {
        cmd.env(crate::config::ENV_PATH, p);
    }
    let mut child = cmd.spawn().map_err(ShimError::Spawn)?;
    // The daemon closes its stdout once it serves (or when it dies).
    let mut out = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut out);
    }
    if let Ok(Some(status)) = child.try_wait() {
        return Err(ShimError::DaemonDied { address, status: status.to_string() });
    }
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let status = child.try_wait().ok().flatten().map(|s| s.to_string()).unwrap_or_else(|| "not serving".into());
        return Err(ShimError::DaemonDied { address, status });
    }
    write_address(&bundle, &address)
}

fn write_address(bundle: &Path, address: &str) -> Result<(), ShimError> {
    let path = bundle.join("address");
    std::fs::write(&path, address).map_err(|source| ShimError::Write { path, source })?;
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(address.as_bytes());
    let _ = stdout.flush();
    Ok(())
}

