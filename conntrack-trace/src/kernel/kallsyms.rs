//! Text ranges of kernel functions from /proc/kallsyms.
//!
//! The eviction hook recognises `early_drop()` on the stack of a slab free by
//! return address, so it needs the function's [start, end) range: the start
//! is its symbol, the end the next symbol's address.

use std::path::Path;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    #[error("cannot read {path}: {msg}")]
    Read { path: String, msg: String },
    #[error("symbol `{0}` not found in /proc/kallsyms")]
    NotFound(String),
    #[error("/proc/kallsyms shows zero addresses (kernel.kptr_restrict; run as root)")]
    Hidden,
}

/// A function's text range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// Finds the text range of `name` (a `t`/`T` symbol, possibly in a module,
/// e.g. `early_drop [nf_conntrack]`).
pub fn function_range(text: &str, name: &str) -> Result<Range, KallsymsError> {
    function_ranges(text, &[name]).remove(0)
}

/// The text ranges of `names`, in one pass over `text`.
pub fn function_ranges(text: &str, names: &[&str]) -> Vec<Result<Range, KallsymsError>> {
    let mut starts: Vec<Option<u64>> = vec![None; names.len()];
    let mut any_nonzero = false;
    let mut addrs: Vec<u64> = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(kind), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        any_nonzero |= addr != 0;
        if !matches!(kind, "t" | "T") {
            continue;
        }
        addrs.push(addr);
        if let Some(i) = names.iter().position(|n| *n == sym)
            && starts[i].is_none()
        {
            starts[i] = Some(addr);
        }
    }
    let hidden = !any_nonzero && !addrs.is_empty();
    // The end is the lowest text address above start (symbols are not sorted
    // across modules in kallsyms output).
    addrs.sort_unstable();
    names
        .iter()
        .zip(starts)
        .map(|(name, start)| {
            if hidden {
                return Err(KallsymsError::Hidden);
            }
            let start = start.ok_or_else(|| KallsymsError::NotFound((*name).to_owned()))?;
            let next = addrs.partition_point(|a| *a <= start);
            let end = addrs.get(next).copied().unwrap_or(start + 4096);
            Ok(Range { start, end })
        })
        .collect()
}

/// The text ranges of `names` from /proc/kallsyms, read once: under
/// emulation (the VM matrix) a read of a 7.x kernel's 200 000 lines takes
/// over a second, and the tracepoint backend needs three functions.
pub fn function_ranges_from_proc(names: &[&str]) -> Vec<Result<Range, KallsymsError>> {
    let path = Path::new("/proc/kallsyms");
    match std::fs::read_to_string(path) {
        Ok(text) => function_ranges(&text, names),
        Err(e) => names
            .iter()
            .map(|_| {
                Err(KallsymsError::Read {
                    path: path.display().to_string(),
                    msg: e.to_string(),
                })
            })
            .collect(),
    }
}

pub fn function_range_from_proc(name: &str) -> Result<Range, KallsymsError> {
    function_ranges_from_proc(&[name]).remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81f8fa20 t __pfx_early_drop
ffffffff81f8fa30 t early_drop
ffffffff81f8fc70 t __pfx___nf_conntrack_alloc
ffffffff81f8fc80 t __nf_conntrack_alloc
ffffffff82400000 D __start_rodata
ffffffffc0001000 t early_drop_list\t[nf_conntrack]
";

    #[test]
    fn range_ends_at_next_text_symbol() {
        let r = function_range(SAMPLE, "early_drop").unwrap();
        assert_eq!(
            r,
            Range {
                start: 0xffffffff81f8fa30,
                end: 0xffffffff81f8fc70
            }
        );
    }

    #[test]
    fn module_symbols_are_found() {
        let r = function_range(SAMPLE, "early_drop_list").unwrap();
        assert_eq!(r.start, 0xffffffffc0001000);
        assert_eq!(r.end, 0xffffffffc0001000 + 4096);
    }

    #[test]
    fn missing_symbol_is_named() {
        assert_eq!(
            function_range(SAMPLE, "nope"),
            Err(KallsymsError::NotFound("nope".into()))
        );
    }

    #[test]
    fn zeroed_addresses_mean_restricted() {
        let hidden = "0000000000000000 t early_drop\n0000000000000000 T foo\n";
        assert_eq!(
            function_range(hidden, "early_drop"),
            Err(KallsymsError::Hidden)
        );
    }

    #[test]
    fn several_ranges_in_one_pass() {
        let r = function_ranges(SAMPLE, &["early_drop", "nope", "__nf_conntrack_alloc"]);
        assert_eq!(
            r[0],
            Ok(Range {
                start: 0xffffffff81f8fa30,
                end: 0xffffffff81f8fc70
            })
        );
        assert_eq!(r[1], Err(KallsymsError::NotFound("nope".into())));
        assert_eq!(r[2].as_ref().map(|r| r.start), Ok(0xffffffff81f8fc80));
    }
}
