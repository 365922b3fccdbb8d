//! Mapping event timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns()`) to
//! wall-clock time for people.

use serde::Serialize;

/// Wall clock and CLOCK_MONOTONIC read at the same instant:
/// `wall = start_unix_ns + (ts_ns - start_mono_ns)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Clock {
    pub start_unix_ns: u128,
    pub start_mono_ns: u64,
}

impl Clock {
    /// Unix nanoseconds of a monotonic timestamp (saturating: the start
    /// may come from a hostile capture file).
    pub fn unix_ns(&self, ts_ns: u64) -> u128 {
        let delta = i128::from(ts_ns) - i128::from(self.start_mono_ns);
        i128::try_from(self.start_unix_ns)
            .unwrap_or(i128::MAX)
            .saturating_add(delta)
            .max(0) as u128
    }

    /// `HH:MM:SS` (UTC) of a monotonic timestamp.
    pub fn hms(&self, ts_ns: u64) -> String {
        let secs = (self.unix_ns(ts_ns) / 1_000_000_000) as u64;
        let s = secs % 86_400;
        format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }

    /// RFC 3339 with milliseconds, UTC (`2026-11-25T12:01:07.250Z`).
    pub fn rfc3339(&self, ts_ns: u64) -> String {
        utc(self.unix_ns(ts_ns))
    }
}

/// Formats Unix ns as UTC `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn utc(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let ms = (unix_ns / 1_000_000 % 1000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // H. Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// days_from_civil).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// CLOCK_MONOTONIC now, in ns: the clock of `bpf_ktime_get_ns()`, which
/// stamps events.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_monotonic_to_wall_clock() {
        // 2026-11-25T12:01:07Z = 1795608067 s.
        let c = Clock {
            start_unix_ns: 1_795_608_067 * 1_000_000_000,
            start_mono_ns: 5_000_000_000,
        };
        assert_eq!(c.hms(5_000_000_000), "12:01:07");
        assert_eq!(c.hms(8_500_000_000), "12:01:10");
        assert_eq!(c.rfc3339(5_250_000_000), "2026-11-25T12:01:07.250Z");
        // Before the start (an event timestamped just before the clocks
        // were read) maps backwards, not to garbage.
        assert_eq!(c.hms(4_000_000_000), "12:01:06");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(
            utc(11_016 * 86_400 * 1_000_000_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        let hostile = Clock {
            start_unix_ns: u128::MAX,
            start_mono_ns: 0,
        };
        let _ = hostile.rfc3339(u64::MAX);
    }
}
