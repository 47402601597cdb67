//! `cargo fuzz run control`: see [`fencelab_fuzz::control`] for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fencelab_fuzz::control::check(data));
