#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sails_fuzz::user_suite(data));
