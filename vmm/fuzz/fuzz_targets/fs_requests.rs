#![no_main]
//! FUSE requests from arbitrary guest memory, served from a scratch directory.
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    hull_vmm::fuzzing::fs_requests(data, dir.path());
});
