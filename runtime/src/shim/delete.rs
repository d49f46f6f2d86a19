//! `containerd-shim-hull-v2 delete`: what containerd runs when a shim died, to undo what the
//! shim left for a container (and the whole pod when it is the pod's own container).

use std::io::Write;
use std::path::PathBuf;

use containerd_shim::Flags;
use containerd_shim_protos::protobuf::Message;

use super::{pod_id, read_bundle_spec, ShimError};
use crate::pod::state::PodDir;

/// `delete`: containerd calls this when the shim died; undo what the shim left for this
/// container (and the whole pod when it is the pod's own container), then print a
/// DeleteResponse.
pub fn delete(flags: &Flags) -> Result<(), ShimError> {
    let bundle = if flags.bundle.is_empty() { std::env::current_dir().map_err(ShimError::Spawn)? } else { PathBuf::from(&flags.bundle) };
    let pod = read_bundle_spec(&bundle).ok().and_then(|s| pod_id(&s, &flags.id).ok()).unwrap_or_else(|| flags.id.clone());
    let dir = PodDir::new(&flags.namespace, &pod);
    crate::pod::share::cleanup_container(&dir, &flags.id, Some(&bundle));
    if pod == flags.id {
        crate::pod::cleanup_pod(&dir);
    }
    let resp = containerd_shim_protos::api::DeleteResponse {
        pid: 0,
        exit_status: 137,
        exited_at: Some(containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::now()).into(),
        ..Default::default()
    };
    let bytes = resp.write_to_bytes().map_err(|e| ShimError::Write { path: "stdout".into(), source: std::io::Error::other(e) })?;
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(&bytes);
    let _ = stdout.flush();
    Ok(())
}

