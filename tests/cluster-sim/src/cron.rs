//! Five-field cron schedules as the CronJob controller reads them (robfig/cron's standard
//! parser): minute hour day-of-month month day-of-week, with `*`, `?`, lists, ranges, steps,
//! month and weekday names, and the `@yearly`…`@hourly` macros. Day-of-month and
//! day-of-week are ORed when both are restricted.

use jiff::civil::DateTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    dom: Vec<bool>,
    months: Vec<bool>,
    dow: Vec<bool>,
    dom_star: bool,
    dow_star: bool,
}

const MONTHS: &[&str] = &[
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(s: &str, names: &[&str], offset: u32) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = names.iter().position(|n| *n == lower) {
        return Ok(u32::try_from(i).unwrap_or(0) + offset);
    }
    s.parse()
        .map_err(|_| format!("failed to parse int from {s}"))
}

fn field(
    spec: &str,
    min: u32,
    max: u32,
    names: &[&str],
    offset: u32,
) -> Result<(Vec<bool>, bool), String> {
    let mut bits = vec![false; usize::try_from(max + 1).unwrap_or(0)];
    let mut star = false;
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                Some(
                    s.parse::<u32>()
                        .map_err(|_| format!("failed to parse int from {s}"))?,
                ),
            ),
            None => (part, None),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            star = step.is_none();
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, names, offset)?, value(b, names, offset)?)
        } else {
            let v = value(range, names, offset)?;
            (v, if step.is_some() { max } else { v })
        };
        let step = step.unwrap_or(1);
        if step == 0 {
            return Err(format!("step of range should be a positive number: {part}"));
        }
        if lo < min || hi > max || lo > hi {
            return Err(format!("end of range ({hi}) above maximum ({max}): {part}"));
        }
        let mut v = lo;
        while v <= hi {
            bits[usize::try_from(v).unwrap_or(0)] = true;
            v += step;
        }
    }
    Ok((bits, star))
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let expanded = match s {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let f: Vec<&str> = expanded.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!("expected exactly 5 fields, found {}: {s}", f.len()));
        }
        let (minutes, _) = field(f[0], 0, 59, &[], 0)?;
        let (hours, _) = field(f[1], 0, 23, &[], 0)?;
        let (dom, dom_star) = field(f[2], 1, 31, &[], 0)?;
        let (months, _) = field(f[3], 1, 12, MONTHS, 1)?;
        let (mut dow, dow_star) = field(f[4], 0, 7, DAYS, 0)?;
        // 7 is Sunday too.
        if dow[7] {
            dow[0] = true;
        }
        Ok(Self {
            minutes,
            hours,
            dom,
            months,
            dow,
            dom_star,
            dow_star,
        })
    }

    pub fn matches(&self, t: DateTime) -> bool {
        let idx = |v: i8| usize::try_from(v).unwrap_or(0);
        let dom_ok = self.dom[idx(t.day())];
        let dow_ok = self.dow[usize::try_from(t.weekday().to_sunday_zero_offset()).unwrap_or(0)];
        let day_ok = if self.dom_star || self.dow_star {
            dom_ok && dow_ok
        } else {
            dom_ok || dow_ok
        };
        self.minutes[idx(t.minute())]
            && self.hours[idx(t.hour())]
            && self.months[idx(t.month())]
            && day_ok
    }

    /// The latest scheduled time in `(after, until]`, looking back at most `limit` minutes.
    pub fn latest_between(&self, after: DateTime, until: DateTime, limit: i64) -> Option<DateTime> {
        let mut t = until.with().second(0).subsec_nanosecond(0).build().ok()?;
        for _ in 0..limit {
            if t <= after {
                return None;
            }
            if self.matches(t) {
                return Some(t);
            }
            t = t.checked_sub(jiff::Span::new().minutes(1)).ok()?;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    #[test]
    fn steps_ranges_and_names() {
        let s = Schedule::parse("*/15 9-17 * jan-mar mon-fri").expect("valid");
        assert!(s.matches(date(2026, 2, 2).at(9, 45, 0, 0)));
        assert!(!s.matches(date(2026, 2, 1).at(9, 45, 0, 0)), "a Sunday");
        assert!(!s.matches(date(2026, 4, 1).at(9, 45, 0, 0)), "April");
        assert!(!s.matches(date(2026, 2, 2).at(9, 50, 0, 0)));
    }

    #[test]
    fn day_fields_are_ored_when_both_are_set() {
        let s = Schedule::parse("0 0 13 * 5").expect("valid");
        assert!(s.matches(date(2026, 3, 13).at(0, 0, 0, 0)));
        assert!(s.matches(date(2026, 3, 6).at(0, 0, 0, 0)), "a Friday");
        assert!(!s.matches(date(2026, 3, 7).at(0, 0, 0, 0)));
    }

    #[test]
    fn bad_schedules_are_refused() {
        assert!(Schedule::parse("not a cron").is_err());
        assert!(Schedule::parse("61 * * * *").is_err());
        assert!(Schedule::parse("* * * *").is_err());
    }

    #[test]
    fn latest_run_in_a_window() {
        let s = Schedule::parse("@hourly").expect("valid");
        let got = s.latest_between(
            date(2026, 1, 1).at(0, 30, 0, 0),
            date(2026, 1, 1).at(3, 10, 0, 0),
            1000,
        );
        assert_eq!(got, Some(date(2026, 1, 1).at(3, 0, 0, 0)));
        assert_eq!(
            s.latest_between(
                date(2026, 1, 1).at(3, 0, 0, 0),
                date(2026, 1, 1).at(3, 10, 0, 0),
                1000
            ),
            None
        );
    }
}
