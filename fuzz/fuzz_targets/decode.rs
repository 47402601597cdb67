//! `cargo fuzz run decode`: see [`fencelab_fuzz::decode`] for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fencelab_fuzz::decode::check(data));
