//! `BPF_MAP_LOOKUP_BATCH` (kernel/bpf/hashtab.c,
//! `__htab_map_lookup_and_delete_batch()`, since 5.6) for the per-CPU
//! source counts: aya 0.14 reads a hash map one key at a time, two
//! syscalls per key (`BPF_MAP_GET_NEXT_KEY`, then a lookup), which at
//! `SOURCE_COUNTS_MAX` keys is 130 000 syscalls at every interval of a
//! flood (issue 15). A batch reads [`BATCH`] entries per syscall.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use conntrack_trace_common::SourceKey;

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call. A hash bucket holding more than this makes
/// the kernel answer ENOSPC without returning anything (it never splits a
/// bucket): the call is repeated with room for twice as many.
pub const BATCH: usize = 4096;
/// The most entries asked for at once after ENOSPC.
const MAX_BATCH: usize = 1 << 20;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// How a batch read ended without reading the map to its end.
#[derive(Debug)]
pub enum Stopped {
    /// Before any entry was handed over (e.g. EINVAL: no batch lookups
    /// for this map type on this kernel): reading key by key instead
    /// gives the same answer.
    Unsupported,
    /// After some entries were handed over.
    Failed(std::io::Error),
}

/// Reads every entry of the per-CPU source-count map (one u64 per
/// possible CPU per key), handing `f` each key and the sum over CPUs.
pub fn sum_per_cpu(
    map: BorrowedFd<'_>,
    ncpus: usize,
    mut f: impl FnMut(&SourceKey, u64),
) -> Result<(), Stopped> {
    let key_size = size_of::<SourceKey>();
    let mut batch = BATCH;
    let mut keys = vec![0u8; batch * key_size];
    let mut values = vec![0u64; batch * ncpus];
    // The batch token (a bucket index for hash maps: a u32); room for a u64.
    let mut token = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    let mut handed = 0u64;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and `count`
        // per-CPU values (ncpus u64s each: the kernel's round_up(8) of a
        // u64) and at two u64 tokens, all alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let done = if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The last entries (`count` of them), and the end.
                Some(libc::ENOENT) => true,
                Some(libc::ENOSPC) if batch < MAX_BATCH => {
                    batch *= 2;
                    keys.resize(batch * key_size, 0);
                    values.resize(batch * ncpus, 0);
                    continue;
                }
                _ if handed == 0 => return Err(Stopped::Unsupported),
                _ => return Err(Stopped::Failed(e)),
            }
        } else {
            false
        };
        let n = (attr.count as usize).min(batch);
        for i in 0..n {
            // SAFETY: the kernel wrote `n` keys of the map's key size;
            // SourceKey is plain integers (read unaligned from bytes).
            let k: SourceKey =
                unsafe { std::ptr::read_unaligned(keys[i * key_size..].as_ptr().cast()) };
            let sum = values[i * ncpus..(i + 1) * ncpus]
                .iter()
                .fold(0u64, |a, v| a.saturating_add(*v));
            f(&k, sum);
        }
        handed += n as u64;
        if done {
            return Ok(());
        }
        token = next;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

    use super::*;

    /// `bpf(cmd, attr)` with a zero-padded attr of the kernel's size.
    fn bpf(cmd: libc::c_long, attr: &[u32]) -> std::io::Result<i64> {
        let mut a = [0u32; 32];
        a[..attr.len()].copy_from_slice(attr);
        // SAFETY: a 128-byte attr, larger than either command reads.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, a.as_mut_ptr(), 128u32) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// The batch read and a key-by-key truth agree on a real
    /// LRU_PERCPU_HASH of source keys, over several batches and with
    /// per-CPU values that differ. Needs root (skipped otherwise).
    #[test]
    fn batches_read_every_key_and_sum_its_cpus() {
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        const LRU_PERCPU_HASH: u32 = 10;
        let key_size = size_of::<SourceKey>() as u32;
        let n = (BATCH * 2 + 123) as u32;
        let fd = match bpf(BPF_MAP_CREATE, &[LRU_PERCPU_HASH, key_size, 8, n * 2]) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("skipped: cannot create a BPF map here ({e})");
                return;
            }
        };
        // SAFETY: a new fd of ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let ncpus = aya::util::nr_cpus().unwrap();
        let mut want = std::collections::BTreeMap::new();
        for i in 0..n {
            let mut k = SourceKey {
                netns: 4026531840,
                kind: (i % 4) as u8,
                l3: 4,
                l4: 17,
                _pad: 0,
                dport: 53,
                _pad2: 0,
                src: [0; 16],
            };
            k.src[..4].copy_from_slice(&i.to_be_bytes());
            let values: Vec<u64> = (0..ncpus as u64).map(|c| u64::from(i) * 10 + c).collect();
            let kp = (&raw const k) as u64;
            let vp = values.as_ptr() as u64;
            bpf(
                BPF_MAP_UPDATE_ELEM,
                &[
                    fd.as_raw_fd() as u32,
                    0,
                    kp as u32,
                    (kp >> 32) as u32,
                    vp as u32,
                    (vp >> 32) as u32,
                ],
            )
            .unwrap();
            want.insert((k.src, k.kind), values.iter().sum::<u64>());
        }
        let mut got = std::collections::BTreeMap::new();
        sum_per_cpu(fd.as_fd(), ncpus, |k, sum| {
            assert!(got.insert((k.src, k.kind), sum).is_none(), "a key twice");
        })
        .unwrap();
        assert_eq!(got, want);
    }
}
