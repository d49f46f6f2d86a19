#![no_main]
//! vsock TX packets (headers, ops, lengths) from arbitrary guest memory.
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let uds = dir.path().join("vsock.sock");
    let _ = std::fs::remove_file(&uds);
    hull_vmm::fuzzing::vsock_packets(data, &uds);
});
