#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keywarden::fuzzing::receipt(data));
