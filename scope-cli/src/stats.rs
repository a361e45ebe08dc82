//! `scope stats` (per-function counts and duration percentiles, one Stats call) and
//! `scope top` (the same, refreshed live, with rates between refreshes).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Result;
use scope_proto::v1::{FunctionStats, SpanFilter, StatsRequest, StatsResponse};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::Client;
use crate::duration::format_duration_ns;
use crate::filter::now_unix_ns;
use crate::render::{Table, format_time_of_day, module_name};

/// Moves the cursor home and clears the screen (what top(1) does between refreshes).
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

async fn fetch(client: &Client, filter: &SpanFilter) -> Result<StatsResponse> {
    Ok(client
        .rpc
        .clone()
        .stats(StatsRequest {
            filter: Some(filter.clone()),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner())
}

pub async fn stats(
    client: &Client,
    out: &mut impl Write,
    filter: &SpanFilter,
    json: bool,
) -> Result<()> {
    let response = fetch(client, filter).await?;
    if json {
        serde_json::to_writer(&mut *out, &StatsJson::from(&response))?;
        writeln!(out)?;
    } else {
        for line in stats_lines(&response) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// `scope stats` as a table with the percentile error below it.
pub fn stats_lines(response: &StatsResponse) -> Vec<String> {
    if response.functions.is_empty() {
        return vec![
            "no calls recorded matching the filter (see `scope sessions`; trace with `scope attach` or `scope trace`)"
                .to_owned(),
        ];
    }
    let rows: Vec<Vec<String>> = response
        .functions
        .iter()
        .map(|f| {
            vec![
                f.function.clone(),
                module_name(&f.module).to_owned(),
                f.count.to_string(),
                format_duration_ns(f.total_ns),
                format_duration_ns(f.mean_ns),
                format_duration_ns(f.p50_ns),
                format_duration_ns(f.p95_ns),
                format_duration_ns(f.p99_ns),
                format_duration_ns(f.max_ns),
            ]
        })
        .collect();
    let mut lines = Table::new(&[
        ("FUNCTION", false),
        ("MODULE", false),
        ("COUNT", true),
        ("TOTAL", true),
        ("MEAN", true),
        ("P50", true),
        ("P95", true),
        ("P99", true),
        ("MAX", true),
    ])
    .render(&rows);
    lines.push(String::new());
    lines.push(percentile_note(response.percentile_relative_error));
    lines
}

fn percentile_note(relative_error: f64) -> String {
    if relative_error > 0.0 {
        format!(
            "percentiles are within ±{}% (from histograms); counts, totals, means and maxima are exact",
            trim_float(relative_error * 100.0)
        )
    } else {
        "percentiles, counts, totals, means and maxima are exact".to_owned()
    }
}

/// `1`, `0.5`, `2.25`: at most two decimals, no trailing zeros.
fn trim_float(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[derive(Serialize)]
pub struct FunctionStatsJson<'a> {
    pub function: &'a str,
    pub module: &'a str,
    pub count: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub min_ns: u64,
}

impl<'a> From<&'a FunctionStats> for FunctionStatsJson<'a> {
    fn from(f: &'a FunctionStats) -> Self {
        FunctionStatsJson {
            function: &f.function,
            module: &f.module,
            count: f.count,
            total_ns: f.total_ns,
            mean_ns: f.mean_ns,
            p50_ns: f.p50_ns,
            p95_ns: f.p95_ns,
            p99_ns: f.p99_ns,
            max_ns: f.max_ns,
            min_ns: f.min_ns,
        }
    }
}

/// `scope stats --json`.
#[derive(Serialize)]
pub struct StatsJson<'a> {
    pub functions: Vec<FunctionStatsJson<'a>>,
    pub percentile_relative_error: f64,
}

impl<'a> From<&'a StatsResponse> for StatsJson<'a> {
    fn from(r: &'a StatsResponse) -> Self {
        StatsJson {
            functions: r.functions.iter().map(FunctionStatsJson::from).collect(),
            percentile_relative_error: r.percentile_relative_error,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `scope top`

pub struct TopOptions {
    pub filter: SpanFilter,
    pub interval: Duration,
    /// Stop after this many refreshes.
    pub count: Option<u64>,
    /// Rows shown (0: all); JSON has every function.
    pub rows: usize,
    pub json: bool,
}

/// One function in a refresh: cumulative numbers and rates since the previous refresh.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopRow {
    pub function: String,
    pub module: String,
    pub calls_per_sec: f64,
    /// Nanoseconds spent in the function per second of wall time (1e9 = one CPU's worth).
    pub time_ns_per_sec: f64,
    pub count: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// Rows for `current`, rated against `previous` taken `elapsed` earlier, in the daemon's
/// order (total time, largest first). A function new since `previous` rates from zero; counts
/// that went down (old spans left the store) rate as zero.
pub fn top_rows(
    previous: &StatsResponse,
    current: &StatsResponse,
    elapsed: Duration,
) -> Vec<TopRow> {
    let before: HashMap<(&str, &str), &FunctionStats> = previous
        .functions
        .iter()
        .map(|f| ((f.function.as_str(), f.module.as_str()), f))
        .collect();
    let secs = elapsed.as_secs_f64().max(1e-9);
    current
        .functions
        .iter()
        .map(|f| {
            let (count0, total0) = before
                .get(&(f.function.as_str(), f.module.as_str()))
                .map_or((0, 0), |p| (p.count, p.total_ns));
            TopRow {
                function: f.function.clone(),
                module: f.module.clone(),
                calls_per_sec: f.count.saturating_sub(count0) as f64 / secs,
                time_ns_per_sec: f.total_ns.saturating_sub(total0) as f64 / secs,
                count: f.count,
                total_ns: f.total_ns,
                mean_ns: f.mean_ns,
                p99_ns: f.p99_ns,
                max_ns: f.max_ns,
            }
        })
        .collect()
}

/// One screen of `scope top` (without the screen control codes).
pub fn top_lines(
    rows: &[TopRow],
    interval: Duration,
    at_unix_ns: u64,
    limit: usize,
) -> Vec<String> {
    let mut lines = vec![format!(
        "scope top  {} UTC  every {}  {} function{}  (Ctrl-C quits)",
        &format_time_of_day(at_unix_ns)[..8],
        format_duration_ns(u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX)),
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
    )];
    lines.push(String::new());
    if rows.is_empty() {
        lines.push("no calls recorded matching the filter yet".to_owned());
        return lines;
    }
    let shown = if limit == 0 {
        rows.len()
    } else {
        rows.len().min(limit)
    };
    let table: Vec<Vec<String>> = rows[..shown]
        .iter()
        .map(|r| {
            vec![
                r.function.clone(),
                module_name(&r.module).to_owned(),
                format_rate(r.calls_per_sec),
                format!("{}/s", format_duration_ns(r.time_ns_per_sec.round() as u64)),
                r.count.to_string(),
                format_duration_ns(r.total_ns),
                format_duration_ns(r.p99_ns),
            ]
        })
        .collect();
    lines.extend(
        Table::new(&[
            ("FUNCTION", false),
            ("MODULE", false),
            ("CALLS/S", true),
            ("TIME/S", true),
            ("COUNT", true),
            ("TOTAL", true),
            ("P99", true),
        ])
        .render(&table),
    );
    if shown < rows.len() {
        lines.push(format!(
            "... {} more (--rows 0 shows all)",
            rows.len() - shown
        ));
    }
    lines
}

/// Calls per second with about three significant digits.
fn format_rate(rate: f64) -> String {
    if rate >= 100.0 || rate == 0.0 {
        format!("{rate:.0}")
    } else if rate >= 10.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate:.2}")
    }
}

/// One line of `scope top --json`.
#[derive(Serialize)]
pub struct TopJson<'a> {
    pub time_unix_ns: u64,
    /// Wall time since the previous refresh, which the rates are over.
    pub interval_ns: u64,
    pub functions: &'a [TopRow],
    pub percentile_relative_error: f64,
}

pub async fn top(client: &Client, out: &mut impl Write, options: TopOptions) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let refresh = refresh_loop(client, out, &options);
    tokio::select! {
        result = refresh => result,
        _ = sigint.recv() => Ok(()),
        _ = sigterm.recv() => Ok(()),
    }
}

async fn refresh_loop(client: &Client, out: &mut impl Write, options: &TopOptions) -> Result<()> {
    let screen = !options.json && std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // The first answer is the baseline: every refresh shown has rates.
    let mut previous = fetch(client, &options.filter).await?;
    let mut previous_at = Instant::now();
    let mut shown: u64 = 0;
    while options.count.is_none_or(|count| shown < count) {
        ticker.tick().await;
        let current = fetch(client, &options.filter).await?;
        let now = Instant::now();
        let elapsed = now - previous_at;
        let rows = top_rows(&previous, &current, elapsed);
        let at = now_unix_ns();
        if options.json {
            serde_json::to_writer(
                &mut *out,
                &TopJson {
                    time_unix_ns: at,
                    interval_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
                    functions: &rows,
                    percentile_relative_error: current.percentile_relative_error,
                },
            )?;
            writeln!(out)?;
        } else {
            if screen {
                write!(out, "{CLEAR_SCREEN}")?;
            } else if shown > 0 {
                writeln!(out)?;
            }
            for line in top_lines(&rows, options.interval, at, options.rows) {
                writeln!(out, "{line}")?;
            }
        }
        out.flush()?;
        previous = current;
        previous_at = now;
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, count: u64, total_ns: u64) -> FunctionStats {
        FunctionStats {
            function: name.into(),
            module: "/usr/bin/redis-server".into(),
            count,
            total_ns,
            mean_ns: total_ns / count.max(1),
            p50_ns: 900,
            p95_ns: 4_000,
            p99_ns: 12_000,
            max_ns: 50_000,
            min_ns: 100,
        }
    }

    fn response(functions: Vec<FunctionStats>) -> StatsResponse {
        StatsResponse {
            functions,
            percentile_relative_error: 0.01,
        }
    }

    #[test]
    fn stats_table_has_every_column_and_the_error_note() {
        let lines = stats_lines(&response(vec![
            function("processCommand", 1000, 2_000_000),
            function("lookupKey", 3000, 900_000),
        ]));
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "FUNCTION", "MODULE", "COUNT", "TOTAL", "MEAN", "P50", "P95", "P99", "MAX"
            ]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "processCommand",
                "redis-server",
                "1000",
                "2.00ms",
                "2.00µs",
                "900ns",
                "4.00µs",
                "12.0µs",
                "50.0µs"
            ]
        );
        assert_eq!(lines.len(), 5);
        assert_eq!(
            lines[4],
            "percentiles are within ±1% (from histograms); counts, totals, means and maxima are exact"
        );
        assert!(stats_lines(&StatsResponse::default())[0].starts_with("no calls recorded"));
        assert_eq!(
            percentile_note(0.005),
            "percentiles are within ±0.5% (from histograms); counts, totals, means and maxima are exact"
        );
    }

    #[test]
    fn stats_json_shape() {
        let r = response(vec![function("f", 2, 10)]);
        let v = serde_json::to_value(StatsJson::from(&r)).expect("serialize");
        assert_eq!(v["percentile_relative_error"], 0.01);
        let f = &v["functions"][0];
        for key in [
            "count", "total_ns", "mean_ns", "p50_ns", "p95_ns", "p99_ns", "max_ns", "min_ns",
        ] {
            assert!(f[key].is_u64(), "{key}");
        }
        assert_eq!(f["function"], "f");
        assert_eq!(f["module"], "/usr/bin/redis-server");
    }

    #[test]
    fn top_rates_come_from_two_answers() {
        let before = response(vec![function("a", 100, 1_000_000), function("gone", 5, 5)]);
        let after = response(vec![
            function("a", 300, 3_000_000),
            function("new", 50, 500),
            function("gone", 2, 2),
        ]);
        let rows = top_rows(&before, &after, Duration::from_secs(2));
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].calls_per_sec, rows[0].time_ns_per_sec),
            (100.0, 1_000_000.0)
        );
        assert_eq!(rows[0].count, 300);
        assert_eq!(rows[1].function, "new");
        assert_eq!(rows[1].calls_per_sec, 25.0);
        assert_eq!(
            rows[2].calls_per_sec, 0.0,
            "counts that shrink rate as zero"
        );
    }

    #[test]
    fn top_screen_shows_rates_and_cumulative_numbers() {
        let rows = top_rows(
            &response(vec![function("a", 100, 1_000_000)]),
            &response(vec![function("a", 350, 3_500_000), function("b", 1, 10)]),
            Duration::from_secs(1),
        );
        let lines = top_lines(&rows, Duration::from_secs(1), 1_700_000_000_000_000_000, 1);
        assert_eq!(
            lines[0],
            "scope top  22:13:20 UTC  every 1.00s  2 functions  (Ctrl-C quits)"
        );
        let header: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "FUNCTION", "MODULE", "CALLS/S", "TIME/S", "COUNT", "TOTAL", "P99"
            ]
        );
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "a",
                "redis-server",
                "250",
                "2.50ms/s",
                "350",
                "3.50ms",
                "12.0µs"
            ]
        );
        assert_eq!(lines[4], "... 1 more (--rows 0 shows all)");
        assert!(!lines.iter().any(|l| l.contains('\x1b')));
        assert_eq!(format_rate(2.5), "2.50");
        assert_eq!(format_rate(12.34), "12.3");
    }
}
