// This file exists so that conntrack-trace can name this crate as a
// build-dependency (cargo then rebuilds it when these sources change); the
// programs themselves are the `conntrack-trace` binary in main.rs.
#![no_std]
