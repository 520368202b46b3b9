//! Windows: rolling durations and calendar periods in an IANA time zone.

use std::fmt;
use std::str::FromStr;

use jiff::ToSpan;
use jiff::tz::TimeZone;

use crate::time::Timestamp;

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// The shortest rolling window: one second.
pub const MIN_ROLLING: u64 = NANOS_PER_SEC;
/// The longest rolling window: 31 days.
pub const MAX_ROLLING: u64 = 31 * 86_400 * NANOS_PER_SEC;

/// A calendar period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CalendarUnit {
    /// A clock minute.
    Minute,
    /// A clock hour (in the zone's offset at the time).
    Hour,
    /// A calendar day, midnight to midnight (23 or 25 hours across DST changes).
    Day,
    /// An ISO week, Monday 00:00 to Monday 00:00.
    Week,
    /// A calendar month, the 1st 00:00 to the next 1st 00:00.
    Month,
}

impl CalendarUnit {
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            CalendarUnit::Minute => "minute",
            CalendarUnit::Hour => "hour",
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
        }
    }
}

/// A window as written in a policy. Copy; the time zone lives on the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// A rolling window of this many nanoseconds (1 s to 31 days).
    Rolling(u64),
    /// A calendar window.
    Calendar(CalendarUnit),
}

/// Why a window string was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Not a duration or a calendar name.
    #[error(
        "unknown window {0:?}: expected a duration such as \"30s\", \"1m\", \"1h\", \"24h\", \"7d\" or a calendar window: minute, hour, day, week, month"
    )]
    Unknown(String),
    /// A duration outside 1 s ..= 31 days.
    #[error("window {0:?} is out of range: rolling windows are 1s to 31d")]
    OutOfRange(String),
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unit = match s {
            "minute" => Some(CalendarUnit::Minute),
            "hour" => Some(CalendarUnit::Hour),
            "day" => Some(CalendarUnit::Day),
            "week" => Some(CalendarUnit::Week),
            "month" => Some(CalendarUnit::Month),
            _ => None,
        };
        if let Some(unit) = unit {
            return Ok(Window::Calendar(unit));
        }
        let nanos = parse_duration(s).ok_or_else(|| WindowError::Unknown(s.to_owned()))?;
        if !(MIN_ROLLING..=MAX_ROLLING).contains(&nanos) {
            return Err(WindowError::OutOfRange(s.to_owned()));
        }
        Ok(Window::Rolling(nanos))
    }
}

/// `"90s"`, `"1h30m"`, `"500ms"`: one or more `<integer><unit>` pairs,
/// units `ms`, `s`, `m`, `h`, `d`, `w`.
fn parse_duration(s: &str) -> Option<u64> {
    let mut rest = s;
    let mut total: u64 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let (number, tail) = rest.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let letters = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(letters);
        let scale = match unit {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3_600 * NANOS_PER_SEC,
            "d" => 86_400 * NANOS_PER_SEC,
            "w" => 7 * 86_400 * NANOS_PER_SEC,
            _ => return None,
        };
        total = total.checked_add(number.checked_mul(scale)?)?;
        rest = tail;
    }
    Some(total)
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Window::Calendar(unit) => f.write_str(unit.name()),
            Window::Rolling(nanos) => {
                let secs = nanos / NANOS_PER_SEC;
                if nanos % NANOS_PER_SEC != 0 {
                    write!(f, "{}ms", nanos / 1_000_000)
                } else if secs % 86_400 == 0 {
                    write!(f, "{}d", secs / 86_400)
                } else if secs % 3_600 == 0 {
                    write!(f, "{}h", secs / 3_600)
                } else if secs % 60 == 0 {
                    write!(f, "{}m", secs / 60)
                } else {
                    write!(f, "{secs}s")
                }
            }
        }
    }
}

/// An unknown IANA time zone name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone {0:?}: expected an IANA name such as \"UTC\" or \"Europe/Berlin\"")]
pub struct UnknownTimeZone(pub String);

/// Look up an IANA time zone in the tz database compiled into the binary.
pub fn time_zone(name: &str) -> Result<TimeZone, UnknownTimeZone> {
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    jiff::tz::db()
        .get(name)
        .map_err(|_| UnknownTimeZone(name.to_owned()))
}

/// The calendar period containing `t`, as `[start, end)` in nanoseconds.
///
/// Days, weeks and months follow the zone's civil calendar, so a day across a
/// DST change lasts 23 or 25 hours. Minutes and hours are cut on the zone's
/// offset at `t`. Never panics: an instant outside the calendar's range falls
/// back to UTC arithmetic on the epoch.
pub(crate) fn calendar_bounds(unit: CalendarUnit, tz: &TimeZone, t: Timestamp) -> (u64, u64) {
    civil_bounds(unit, tz, t).unwrap_or_else(|| {
        let len = match unit {
            CalendarUnit::Minute => 60,
            CalendarUnit::Hour => 3_600,
            CalendarUnit::Day => 86_400,
            CalendarUnit::Week | CalendarUnit::Month => 7 * 86_400,
        } * NANOS_PER_SEC;
        let start = t.as_nanos() - t.as_nanos() % len;
        (start, start.saturating_add(len))
    })
}

fn civil_bounds(unit: CalendarUnit, tz: &TimeZone, t: Timestamp) -> Option<(u64, u64)> {
    let ts = jiff::Timestamp::from_nanosecond(i128::from(t.as_nanos())).ok()?;
    let zoned = ts.to_zoned(tz.clone());
    let to_u64 = |z: &jiff::Zoned| u64::try_from(z.timestamp().as_nanosecond()).ok();
    match unit {
        CalendarUnit::Minute | CalendarUnit::Hour => {
            let len: i128 = if unit == CalendarUnit::Minute {
                60
            } else {
                3_600
            } * i128::from(NANOS_PER_SEC);
            let offset = i128::from(zoned.offset().seconds()) * i128::from(NANOS_PER_SEC);
            let local = i128::from(t.as_nanos()) + offset;
            let start = local - local.rem_euclid(len) - offset;
            Some((u64::try_from(start).ok()?, u64::try_from(start + len).ok()?))
        }
        CalendarUnit::Day => {
            let start = zoned.start_of_day().ok()?;
            let end = zoned.date().tomorrow().ok()?.to_zoned(tz.clone()).ok()?;
            Some((to_u64(&start)?, to_u64(&end.start_of_day().ok()?)?))
        }
        CalendarUnit::Week => {
            let date = zoned.date();
            let monday = date
                .checked_sub(i64::from(date.weekday().to_monday_zero_offset()).days())
                .ok()?;
            let next = monday.checked_add(7.days()).ok()?;
            let start = monday.to_zoned(tz.clone()).ok()?.start_of_day().ok()?;
            let end = next.to_zoned(tz.clone()).ok()?.start_of_day().ok()?;
            Some((to_u64(&start)?, to_u64(&end)?))
        }
        CalendarUnit::Month => {
            let first = zoned.date().first_of_month();
            let next = first.checked_add(1.month()).ok()?;
            let start = first.to_zoned(tz.clone()).ok()?.start_of_day().ok()?;
            let end = next.to_zoned(tz.clone()).ok()?.start_of_day().ok()?;
            Some((to_u64(&start)?, to_u64(&end)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        let ts: jiff::Timestamp = s.parse().unwrap();
        Timestamp::from_nanos(u64::try_from(ts.as_nanosecond()).unwrap())
    }

    #[test]
    fn parses_durations_and_calendar_names() {
        assert_eq!("30s".parse(), Ok(Window::Rolling(30 * NANOS_PER_SEC)));
        assert_eq!("1m".parse(), Ok(Window::Rolling(60 * NANOS_PER_SEC)));
        assert_eq!("1h30m".parse(), Ok(Window::Rolling(5_400 * NANOS_PER_SEC)));
        assert_eq!("24h".parse(), Ok(Window::Rolling(86_400 * NANOS_PER_SEC)));
        assert_eq!(
            "31d".parse::<Window>().map(|w| w.to_string()),
            Ok("31d".into())
        );
        assert_eq!("day".parse(), Ok(Window::Calendar(CalendarUnit::Day)));
        assert!(matches!(
            "500ms".parse::<Window>(),
            Err(WindowError::OutOfRange(_))
        ));
        assert!(matches!(
            "32d".parse::<Window>(),
            Err(WindowError::OutOfRange(_))
        ));
        for bad in [
            "",
            "h",
            "1",
            "1y",
            "-1s",
            "1.5h",
            "fortnight",
            "99999999999999999999s",
        ] {
            assert!(
                matches!(bad.parse::<Window>(), Err(WindowError::Unknown(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn day_across_dst_in_new_york() {
        let tz = time_zone("America/New_York").unwrap();
        // 2026-03-08 is the spring-forward day: 23 hours long.
        let (start, end) = calendar_bounds(CalendarUnit::Day, &tz, at("2026-03-08T12:00:00Z"));
        assert_eq!(start, at("2026-03-08T05:00:00Z").as_nanos());
        assert_eq!(end, at("2026-03-09T04:00:00Z").as_nanos());
        assert_eq!(end - start, 23 * 3_600 * NANOS_PER_SEC);
    }

    #[test]
    fn week_and_month() {
        let tz = time_zone("Europe/Berlin").unwrap();
        // Sunday 2026-11-22 lies in the ISO week starting Monday 2026-11-16.
        let (start, end) = calendar_bounds(CalendarUnit::Week, &tz, at("2026-11-22T10:00:00Z"));
        assert_eq!(start, at("2026-11-15T23:00:00Z").as_nanos());
        assert_eq!(end, at("2026-11-22T23:00:00Z").as_nanos());
        let (start, end) = calendar_bounds(
            CalendarUnit::Month,
            &TimeZone::UTC,
            at("2028-02-29T23:59:59Z"),
        );
        assert_eq!(start, at("2028-02-01T00:00:00Z").as_nanos());
        assert_eq!(end, at("2028-03-01T00:00:00Z").as_nanos());
    }

    #[test]
    fn hour_in_a_half_hour_zone() {
        let tz = time_zone("Asia/Kolkata").unwrap();
        let (start, end) = calendar_bounds(CalendarUnit::Hour, &tz, at("2026-01-01T10:45:00Z"));
        assert_eq!(start, at("2026-01-01T10:30:00Z").as_nanos());
        assert_eq!(end, at("2026-01-01T11:30:00Z").as_nanos());
    }

    #[test]
    fn unknown_zone() {
        assert!(time_zone("Mars/Olympus").is_err());
        assert!(time_zone("Europe/Berlin").is_ok());
    }
}
