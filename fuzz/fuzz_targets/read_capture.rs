//! A whole capture file from bytes: framing, lengths, checksums, then the
//! records. Must never panic or allocate from an unchecked length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = conntrack_trace::capture::reader::read_bytes(data);
});
