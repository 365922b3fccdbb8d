//! A whole capture file from bytes: framing, lengths, checksums, then the
//! records. Must never panic or allocate from an unchecked length. See
//! `read_fuzz_input` for the mode byte (CRC fix-up to get past checksums).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = conntrack_trace::formats::capture::reader::read_fuzz_input(data);
});
