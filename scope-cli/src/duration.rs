//! Human durations: parsing `--duration 5s` and printing span durations (`12.3µs`).

use std::time::Duration;

/// Units accepted by [`parse_duration`], longest spelling first so `ms` wins over `m`.
const UNITS: &[(&str, u64)] = &[
    ("nsec", 1),
    ("ns", 1),
    ("usec", 1_000),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("msec", 1_000_000),
    ("ms", 1_000_000),
    ("seconds", 1_000_000_000),
    ("second", 1_000_000_000),
    ("secs", 1_000_000_000),
    ("sec", 1_000_000_000),
    ("s", 1_000_000_000),
    ("minutes", 60_000_000_000),
    ("minute", 60_000_000_000),
    ("mins", 60_000_000_000),
    ("min", 60_000_000_000),
    ("m", 60_000_000_000),
    ("hours", 3_600_000_000_000),
    ("hour", 3_600_000_000_000),
    ("h", 3_600_000_000_000),
];

const HINT: &str = "use e.g. 500ms, 5s, 1m30s, 2m or 1h";

/// Parses `5s`, `500ms`, `2m`, `1.5s`, `1m30s`, `100us`; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("empty duration ({HINT})"));
    }
    if let Ok(secs) = trimmed.parse::<f64>() {
        return from_secs(secs, text);
    }
    let mut rest = trimmed;
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return Err(format!(
                "invalid duration '{text}': expected a number ({HINT})"
            ));
        }
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number.parse().map_err(|_| {
            format!("invalid duration '{text}': '{number}' is not a number ({HINT})")
        })?;
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(format!(
                "invalid duration '{text}': missing unit after '{number}' ({HINT})"
            ));
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(format!(
                "invalid duration '{text}': unknown unit '{unit}' ({HINT})"
            ));
        };
        total_ns += value * scale as f64;
        rest = next.trim_start();
    }
    from_secs(total_ns / 1e9, text)
}

fn from_secs(secs: f64, text: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("invalid duration '{text}': out of range ({HINT})"))
}

/// A span duration with a unit and about three significant digits: `850ns`, `12.3µs`,
/// `4.56ms`, `1.20s`, `2m03s`.
pub fn format_duration_ns(ns: u64) -> String {
    const MINUTE: u64 = 60_000_000_000;
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns >= MINUTE {
        let secs = ns / 1_000_000_000;
        let (hours, minutes, secs) = (secs / 3600, secs / 60 % 60, secs % 60);
        return if hours > 0 {
            format!("{hours}h{minutes:02}m{secs:02}s")
        } else {
            format!("{minutes}m{secs:02}s")
        };
    }
    let (value, unit) = if ns < 1_000_000 {
        (ns as f64 / 1e3, "µs")
    } else if ns < 1_000_000_000 {
        (ns as f64 / 1e6, "ms")
    } else {
        (ns as f64 / 1e9, "s")
    };
    let text = if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    };
    // Rounding can carry into the next unit (999.7µs prints as "1000µs"); that is still
    // correct and readable, so leave it.
    format!("{text}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("100µs"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("250ns"), Ok(Duration::from_nanos(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 10sec "), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bad_durations_with_a_hint() {
        for bad in ["", "s", "5x", "5 parsecs", "-1s", "1..2s", "ms5", "-3"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("e.g. 500ms"), "{bad}: {err}");
        }
        assert!(
            parse_duration("5x")
                .expect_err("unknown unit")
                .contains("unknown unit 'x'")
        );
    }

    #[test]
    fn formats_durations_with_units() {
        assert_eq!(format_duration_ns(0), "0ns");
        assert_eq!(format_duration_ns(850), "850ns");
        assert_eq!(format_duration_ns(1_000), "1.00µs");
        assert_eq!(format_duration_ns(12_345), "12.3µs");
        assert_eq!(format_duration_ns(123_456), "123µs");
        assert_eq!(format_duration_ns(4_560_000), "4.56ms");
        assert_eq!(format_duration_ns(1_200_000_000), "1.20s");
        assert_eq!(format_duration_ns(59_000_000_000), "59.0s");
        assert_eq!(format_duration_ns(123_000_000_000), "2m03s");
        assert_eq!(format_duration_ns(3_723_000_000_000), "1h02m03s");
    }
}
