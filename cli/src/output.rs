//! Printing: aligned tables for people, JSON for scripts, times.

use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::ValueEnum;

use crate::error::{CliError, CliResult};

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (`watch`: one JSON object per line).
    Json,
}

/// Writes `text` to stdout. A closed pipe (`dcron tasks | head`) ends the
/// command quietly.
pub fn print(text: &str) -> CliResult<()> {
    let mut out = std::io::stdout().lock();
    let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(CliError::failure(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints `value` as pretty JSON followed by a newline.
pub fn print_json(value: &serde_json::Value) -> CliResult<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::failure(format!("cannot encode JSON: {e}")))?;
    print(&format!("{text}\n"))
}

/// Prints `value` as one line of JSON.
pub fn print_json_line(value: &serde_json::Value) -> CliResult<()> {
    print(&format!("{value}\n"))
}

/// Renders rows under a header, columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0);
            text.extend(std::iter::repeat_n(
                ' ',
                pad.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Now, epoch milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// RFC 3339 in UTC with milliseconds, or `None` for an out-of-range value.
pub fn rfc3339(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// `2026-01-02T03:04:05Z (12s ago)` / `(in 3m)` for tables.
pub fn human_time(ms: i64, now: i64) -> String {
    let Some(t) = DateTime::<Utc>::from_timestamp_millis(ms) else {
        return "-".into();
    };
    let abs = t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let delta = ms - now;
    let span = human_span(delta.unsigned_abs());
    if delta.abs() < 1000 {
        format!("{abs} (now)")
    } else if delta < 0 {
        format!("{abs} ({span} ago)")
    } else {
        format!("{abs} (in {span})")
    }
}

/// A short, rounded duration: `45s`, `3m`, `2h`, `5d`.
fn human_span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONG"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]],
        );
        assert_eq!(t, "A    LONG\nxyz  1\nq\n");
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(human_time(0, 5_000), "1970-01-01T00:00:00Z (5s ago)");
        assert_eq!(human_time(600_000, 0), "1970-01-01T00:10:00Z (in 10m)");
        assert_eq!(human_time(0, 200), "1970-01-01T00:00:00Z (now)");
    }
}
