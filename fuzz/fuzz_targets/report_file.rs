//! A capture file through `report`: reader, analysis and every renderer
//! (hostile headers and timestamps reach arithmetic there). Same mode byte
//! as `read_capture`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("ctt-fuzz-{}.ctt", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    conntrack_trace::drivers::report::fuzz_report(data, scratch());
});
