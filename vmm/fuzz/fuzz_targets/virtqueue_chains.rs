#![no_main]
//! Descriptor chains from arbitrary guest memory: the walk must end and stay in bounds.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hull_vmm::fuzzing::virtqueue_chains(data));
