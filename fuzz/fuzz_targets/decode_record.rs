//! One record body, past the checksum (which would stop nearly every
//! mutation in `read_capture` before the decoders see it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = conntrack_trace::formats::capture::format::decode_body(data);
});
