//! Cron schedules: parsing (via `croner`) and fire-time arithmetic in UTC
//! epoch milliseconds, evaluated in a time zone.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

use crate::error::{Error, Result};

/// A parsed cron expression bound to a time zone.
///
/// Accepts 5 fields (minute first), 6 fields (seconds first), an optional
/// trailing year, descriptors (`@hourly`, `@daily`, ...), `L`, `W`, `#`, and
/// a `CRON_TZ=Area/City ` (or `TZ=`) prefix overriding the default zone.
/// Fire times are computed in that zone, so DST changes behave as people
/// expect: a time skipped by the gap runs right after it, a repeated hour
/// runs once.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `expr`, using `default_tz` unless the expression names a zone.
    pub fn parse(expr: &str, default_tz: Tz) -> Result<Schedule> {
        let invalid = |reason: String| Error::InvalidCron {
            expr: expr.to_string(),
            reason,
        };
        let trimmed = expr.trim();
        let (tz, pattern) = match trimmed
            .strip_prefix("CRON_TZ=")
            .or_else(|| trimmed.strip_prefix("TZ="))
        {
            Some(rest) => {
                let (zone, pattern) = rest
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| invalid("a time zone prefix needs a pattern after it".into()))?;
                let tz = Tz::from_str(zone)
                    .map_err(|_| invalid(format!("unknown time zone `{zone}`")))?;
                (tz, pattern.trim())
            }
            None => (default_tz, trimmed),
        };
        let cron = parse_pattern(pattern).map_err(|e| invalid(explain(pattern, &e)))?;
        // A pattern that never fires (e.g. 30 February) is a mistake too.
        let probe = Utc::now().with_timezone(&tz);
        cron.find_next_occurrence(&probe, false)
            .map_err(|e| invalid(format!("it never fires: {e}")))?;
        Ok(Schedule {
            expr: expr.to_string(),
            cron,
            tz,
        })
    }

    /// The expression as given.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The zone the expression is evaluated in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// First fire time strictly after `after_ms` (epoch ms), if any.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let at = self.tz.from_utc_datetime(&to_utc(after_ms)?.naive_utc());
        let next = self.cron.find_next_occurrence(&at, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// Latest fire time at or before `at_ms` (epoch ms), if any.
    pub fn latest_at_or_before(&self, at_ms: i64) -> Option<i64> {
        let at = self.tz.from_utc_datetime(&to_utc(at_ms)?.naive_utc());
        let prev = self.cron.find_previous_occurrence(&at, true).ok()?;
        Some(prev.timestamp_millis())
    }
}

fn parse_pattern(pattern: &str) -> std::result::Result<croner::Cron, croner::errors::CronError> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(pattern)
}

/// The fields of a 5- or 6-field pattern, with what each allows.
const FIELDS_5: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31, L, W"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT, L, #"),
];

/// Why `pattern` does not parse, naming the field at fault and what it
/// allows when one field alone is wrong (found by parsing it with every
/// other field a wildcard).
fn explain(pattern: &str, err: &croner::errors::CronError) -> String {
    let fields: Vec<&str> = pattern.split_whitespace().collect();
    let named: Vec<(&str, &str)> = match fields.len() {
        5 => FIELDS_5.to_vec(),
        6 => std::iter::once(("second", "0-59"))
            .chain(FIELDS_5)
            .collect(),
        7 => std::iter::once(("second", "0-59"))
            .chain(FIELDS_5)
            .chain(std::iter::once(("year", "a year")))
            .collect(),
        n if !pattern.starts_with('@') => {
            return format!("{n} fields; use 5 (minute hour day-of-month month day-of-week), or 6 with seconds first");
        }
        _ => return err.to_string(),
    };
    for (i, (name, allowed)) in named.iter().enumerate() {
        let alone: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { fields[j] } else { "*" })
            .collect();
        if parse_pattern(&alone.join(" ")).is_err() {
            return format!(
                "the {name} field `{}` is invalid ({err}); it allows {allowed}, lists, ranges and steps",
                fields[i]
            );
        }
    }
    err.to_string()
}

fn to_utc(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_what_it_allows() {
        let reason = |expr: &str| match Schedule::parse(expr, Tz::UTC) {
            Err(Error::InvalidCron { reason, .. }) => reason,
            other => panic!("{expr}: {:?}", other.map(|s| s.expr().to_string())),
        };
        let r = reason("0 25 * * *");
        assert!(r.contains("hour field `25`") && r.contains("0-23"), "{r}");
        let r = reason("61 * * * * *");
        assert!(r.contains("second field `61`") && r.contains("0-59"), "{r}");
        let r = reason("* * * 13 *");
        assert!(r.contains("month field `13`"), "{r}");
        let r = reason("* * * * * * * *");
        assert!(r.contains("8 fields"), "{r}");
    }

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn utc(ms: i64) -> String {
        DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339()
    }

    fn fires(expr: &str, from: &str, n: usize) -> Vec<String> {
        let s = Schedule::parse(expr, Tz::UTC).unwrap();
        let mut t = ms(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                utc(t)
            })
            .collect()
    }

    #[test]
    fn five_and_six_fields_and_descriptors() {
        assert_eq!(
            fires("*/20 * * * * *", "2026-01-01T00:00:00Z", 2),
            ["2026-01-01T00:00:20+00:00", "2026-01-01T00:00:40+00:00"]
        );
        assert_eq!(
            fires("5 * * * *", "2026-01-01T00:00:00Z", 1),
            ["2026-01-01T00:05:00+00:00"]
        );
        assert_eq!(
            fires("@hourly", "2026-01-01T00:30:00Z", 1),
            ["2026-01-01T01:00:00+00:00"]
        );
    }

    #[test]
    fn last_weekday_and_nth() {
        // Last day of February 2026.
        assert_eq!(
            fires("0 0 L 2 *", "2026-02-01T00:00:00Z", 1),
            ["2026-02-28T00:00:00+00:00"]
        );
        // Weekday nearest the 1st of August 2026 (a Saturday) is Monday the 3rd.
        assert_eq!(
            fires("0 0 1W 8 *", "2026-07-15T00:00:00Z", 1),
            ["2026-08-03T00:00:00+00:00"]
        );
        // Second Tuesday of March 2026.
        assert_eq!(
            fires("0 0 * 3 2#2", "2026-03-01T00:00:00Z", 1),
            ["2026-03-10T00:00:00+00:00"]
        );
    }

    #[test]
    fn timezone_prefix_and_dst() {
        // New York springs forward on 2026-03-08: 02:30 does not exist and runs right after the gap.
        let s = Schedule::parse("CRON_TZ=America/New_York 0 30 2 * * *", Tz::UTC).unwrap();
        assert_eq!(s.timezone(), chrono_tz::America::New_York);
        let t = s.next_after(ms("2026-03-08T00:00:00-05:00")).unwrap();
        assert_eq!(utc(t), "2026-03-08T07:00:00+00:00"); // 03:00 EDT
                                                         // Falls back on 2026-11-01: 01:30 happens twice but runs once.
        let s = Schedule::parse("0 30 1 * * *", chrono_tz::America::New_York).unwrap();
        let first = s.next_after(ms("2026-11-01T00:00:00-04:00")).unwrap();
        let second = s.next_after(first).unwrap();
        assert_eq!(utc(first), "2026-11-01T05:30:00+00:00");
        assert_eq!(utc(second), "2026-11-02T06:30:00+00:00");
    }

    #[test]
    fn every_second_across_fall_back_is_continuous() {
        let s = Schedule::parse("*/5 * * * * *", chrono_tz::America::New_York).unwrap();
        let mut t = ms("2026-11-01T00:59:55-04:00");
        for _ in 0..(2 * 3600 / 5) {
            let next = s.next_after(t).unwrap();
            assert_eq!(next - t, 5_000, "gap at {}", utc(t));
            t = next;
        }
    }

    #[test]
    fn latest_at_or_before() {
        let s = Schedule::parse("0 * * * * *", Tz::UTC).unwrap();
        let at = ms("2026-01-01T10:00:30Z");
        assert_eq!(
            utc(s.latest_at_or_before(at).unwrap()),
            "2026-01-01T10:00:00+00:00"
        );
        let exact = ms("2026-01-01T10:01:00Z");
        assert_eq!(s.latest_at_or_before(exact), Some(exact));
    }

    #[test]
    fn invalid() {
        for bad in [
            "",
            "* * *",
            "61 * * * * *",
            "CRON_TZ=Mars/Base * * * * *",
            "CRON_TZ=UTC",
            "0 0 30 2 *",
            "nonsense",
        ] {
            assert!(
                matches!(
                    Schedule::parse(bad, Tz::UTC),
                    Err(Error::InvalidCron { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
    }
}
