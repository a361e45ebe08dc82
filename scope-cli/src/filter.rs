//! Which stored spans a command asks for: the `--pid/--func/--session/--since/--until/
//! --min-duration/--trace` options and the `SpanFilter` they become.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use scope_proto::v1::SpanFilter;

use crate::duration::parse_duration;

/// A point in time as the user wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSpec {
    /// This long before now (`5m`).
    Ago(Duration),
    /// Unix nanoseconds (an RFC 3339 time, or the number itself).
    At(u64),
}

impl TimeSpec {
    pub fn resolve(self, now_unix_ns: u64) -> u64 {
        match self {
            TimeSpec::Ago(ago) => {
                now_unix_ns.saturating_sub(u64::try_from(ago.as_nanos()).unwrap_or(u64::MAX))
            }
            TimeSpec::At(ns) => ns,
        }
    }
}

const TIME_HINT: &str = "use a duration before now (30s, 5m, 2h), an RFC 3339 time (2024-05-01T13:00:00Z) or Unix nanoseconds";

/// Digits from which a bare number is Unix nanoseconds rather than seconds ago
/// (10^15 ns is 11 days after 1970).
const UNIX_NS_MIN_DIGITS: usize = 16;

/// Parses `5m` (ago), `2024-05-01T13:00:00.5+02:00` (RFC 3339) or `1714568400000000000`
/// (Unix nanoseconds: a bare number of 16 digits or more; shorter ones are seconds ago).
pub fn parse_time(text: &str) -> Result<TimeSpec, String> {
    let text = text.trim();
    if text.len() >= UNIX_NS_MIN_DIGITS && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(TimeSpec::At)
            .map_err(|_| format!("invalid time '{text}': too large for Unix nanoseconds"));
    }
    if looks_like_date(text) {
        return parse_rfc3339(text)
            .map(TimeSpec::At)
            .map_err(|why| format!("invalid time '{text}': {why} ({TIME_HINT})"));
    }
    parse_duration(text)
        .map(TimeSpec::Ago)
        .map_err(|_| format!("invalid time '{text}' ({TIME_HINT})"))
}

/// `YYYY-` at the start.
fn looks_like_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() > 4 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

/// RFC 3339 (`2024-05-01T13:00:00Z`, `... 13:00:00.123456789+02:00`; `T` may be a space) to
/// Unix nanoseconds.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>, what: &str| -> Result<u64, String> {
        let part = text
            .get(range)
            .filter(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| format!("expected the {what} as digits"))?;
        part.parse().map_err(|_| format!("bad {what}"))
    };
    let expect = |at: usize, chars: &[u8], what: &str| -> Result<(), String> {
        match b.get(at) {
            Some(c) if chars.contains(c) => Ok(()),
            _ => Err(format!("expected {what} at position {}", at + 1)),
        }
    };
    let year = digits(0..4, "year")?;
    expect(4, b"-", "'-'")?;
    let month = digits(5..7, "month")?;
    expect(7, b"-", "'-'")?;
    let day = digits(8..10, "day")?;
    expect(10, b"Tt ", "'T'")?;
    let hour = digits(11..13, "hour")?;
    expect(13, b":", "':'")?;
    let minute = digits(14..16, "minute")?;
    expect(16, b":", "':'")?;
    let second = digits(17..19, "second")?;
    let mut at = 19;
    let mut nanos = 0u64;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if end == start || end - start > 9 {
            return Err("expected 1 to 9 digits of fraction".to_owned());
        }
        let fraction: u64 = digits(start..end, "fraction")?;
        nanos = fraction * 10u64.pow(9 - (end - start) as u32);
        at = end;
    }
    let offset_secs: i64 = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() => {
            let hours = digits(at + 1..at + 3, "offset hours")? as i64;
            expect(at + 3, b":", "':' in the offset")?;
            let minutes = digits(at + 4..at + 6, "offset minutes")? as i64;
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return Err("expected a time zone: Z or +HH:MM".to_owned()),
    };
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err("no such date or time".to_owned());
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset_secs;
    let secs = u64::try_from(secs).map_err(|_| "before 1970".to_owned())?;
    secs.checked_mul(1_000_000_000)
        .and_then(|ns| ns.checked_add(nanos))
        .ok_or_else(|| "too far in the future".to_owned())
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A trace id: 32 hex digits.
pub fn parse_trace_id(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "invalid trace id '{text}': expected 32 hex digits (see the trace_id of `scope calls --json`)"
        ))
    }
}

fn parse_min_duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

/// Now, in Unix nanoseconds.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Which process, function and session.
#[derive(Args, Clone, Debug, Default)]
pub struct TargetArgs {
    /// Only calls in this process.
    #[arg(long, short)]
    pub pid: Option<u32>,
    /// Only calls of functions matching this glob.
    #[arg(long = "func", short, value_name = "GLOB")]
    pub function: Option<String>,
    /// Only calls recorded by this session.
    #[arg(long, value_name = "ID")]
    pub session: Option<u64>,
}

/// When the calls started.
#[derive(Args, Clone, Debug, Default)]
pub struct TimeArgs {
    /// Only calls that started at or after this time: a duration before now (`5m`), an
    /// RFC 3339 time (`2024-05-01T13:00:00Z`) or Unix nanoseconds.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<TimeSpec>,
    /// Only calls that started before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<TimeSpec>,
}

/// How long, and which trace.
#[derive(Args, Clone, Debug, Default)]
pub struct CallArgs {
    /// Only calls that took at least this long (`1ms`, `250us`).
    #[arg(long, value_name = "DURATION", value_parser = parse_min_duration)]
    pub min_duration: Option<Duration>,
    /// Only calls of this trace (32 hex digits, the trace_id of `scope calls --json`).
    #[arg(long = "trace", value_name = "TRACE_ID", value_parser = parse_trace_id)]
    pub trace_id: Option<String>,
}

/// The wire filter. Time specs are resolved against `now_unix_ns`.
pub fn span_filter(
    target: &TargetArgs,
    time: Option<&TimeArgs>,
    call: Option<&CallArgs>,
    now_unix_ns: u64,
) -> SpanFilter {
    let resolve = |spec: Option<TimeSpec>| spec.map_or(0, |s| s.resolve(now_unix_ns));
    SpanFilter {
        session_id: target.session.unwrap_or(0),
        pid: target.pid.unwrap_or(0),
        function: target.function.clone().unwrap_or_default(),
        since_unix_ns: resolve(time.and_then(|t| t.since)),
        until_unix_ns: resolve(time.and_then(|t| t.until)),
        min_duration_ns: call
            .and_then(|c| c.min_duration)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        trace_id: call.and_then(|c| c.trace_id.clone()).unwrap_or_default(),
    }
}

/// Checks a filter's time range before it goes to scoped.
pub fn check_range(filter: &SpanFilter) -> Result<(), String> {
    if filter.since_unix_ns != 0
        && filter.until_unix_ns != 0
        && filter.until_unix_ns <= filter.since_unix_ns
    {
        return Err("--until is not after --since: nothing can match".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_durations_ago_rfc3339_or_unix_ns() {
        assert_eq!(
            parse_time("5m"),
            Ok(TimeSpec::Ago(Duration::from_secs(300)))
        );
        assert_eq!(parse_time("90"), Ok(TimeSpec::Ago(Duration::from_secs(90))));
        assert_eq!(
            parse_time("1714568400000000000"),
            Ok(TimeSpec::At(1_714_568_400_000_000_000))
        );
        assert_eq!(
            parse_time("2024-05-01T13:00:00Z"),
            Ok(TimeSpec::At(1_714_568_400_000_000_000))
        );
        assert_eq!(
            parse_time("2024-05-01T15:00:00.5+02:00"),
            Ok(TimeSpec::At(1_714_568_400_500_000_000))
        );
        assert_eq!(
            parse_time("2024-05-01 12:30:00.000000001-00:30"),
            Ok(TimeSpec::At(1_714_568_400_000_000_001))
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00Z"),
            Ok(951_782_400_000_000_000)
        );
        assert_eq!(
            TimeSpec::Ago(Duration::from_secs(1)).resolve(5_000_000_000),
            4_000_000_000
        );
        assert_eq!(TimeSpec::Ago(Duration::from_secs(10)).resolve(5), 0);
    }

    #[test]
    fn bad_times_say_what_is_accepted() {
        for bad in [
            "yesterday",
            "2024-05-01",
            "2024-05-01T13:00:00",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T13:00:00.Z",
            "2024-05-01T13:00:00.1234567890Z",
            "2024-05-01T13:00:00+0200",
            "1969-12-31T23:59:59Z",
        ] {
            let err = parse_time(bad).expect_err(bad);
            assert!(err.contains("RFC 3339"), "{bad}: {err}");
        }
        assert!(
            parse_time("2023-02-29T00:00:00Z")
                .expect_err("no such day")
                .contains("no such date")
        );
    }

    #[test]
    fn trace_ids_are_32_hex_digits() {
        assert_eq!(
            parse_trace_id("0123456789ABCDEF0123456789abcdef"),
            Ok("0123456789abcdef0123456789abcdef".to_owned())
        );
        assert!(parse_trace_id("0123").is_err());
        assert!(parse_trace_id("g123456789abcdef0123456789abcdef").is_err());
    }

    #[test]
    fn filters_reach_the_wire() {
        let filter = span_filter(
            &TargetArgs {
                pid: Some(7),
                function: Some("f*".into()),
                session: Some(3),
            },
            Some(&TimeArgs {
                since: Some(TimeSpec::Ago(Duration::from_secs(60))),
                until: Some(TimeSpec::At(99_000_000_000)),
            }),
            Some(&CallArgs {
                min_duration: Some(Duration::from_millis(1)),
                trace_id: Some("ab".repeat(16)),
            }),
            100_000_000_000,
        );
        assert_eq!(filter.pid, 7);
        assert_eq!(filter.function, "f*");
        assert_eq!(filter.session_id, 3);
        assert_eq!(filter.since_unix_ns, 40_000_000_000);
        assert_eq!(filter.until_unix_ns, 99_000_000_000);
        assert_eq!(filter.min_duration_ns, 1_000_000);
        assert_eq!(filter.trace_id, "ab".repeat(16));
        assert!(check_range(&filter).is_ok());
        let empty = span_filter(&TargetArgs::default(), None, None, 5);
        assert_eq!(empty, SpanFilter::default());
        let backwards = SpanFilter {
            since_unix_ns: 10,
            until_unix_ns: 5,
            ..SpanFilter::default()
        };
        assert!(check_range(&backwards).is_err());
    }
}
