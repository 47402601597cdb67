//! `cargo fuzz run gpu`: see [`fencelab_fuzz::gpu`] for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fencelab_fuzz::gpu::check(data));
