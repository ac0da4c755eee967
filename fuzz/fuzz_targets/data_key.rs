#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keywarden::fuzzing::data_key(data));
