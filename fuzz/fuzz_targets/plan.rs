//! `cargo fuzz run plan`: see [`fencelab_fuzz::plan`] for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fencelab_fuzz::plan::check(data));
