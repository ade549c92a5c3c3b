//! A CronJob schedule checked as Kubernetes checks it (robfig/cron's standard parser): five
//! fields — minute, hour, day of month, month, day of week — with lists, ranges, steps, `*`
//! and `?`, month and weekday names, or one of the `@` descriptors. Refused here, a schedule
//! becomes a clear condition instead of a CronJob the API server rejects.

const DESCRIPTORS: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];
const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &MONTHS,
    },
    Field {
        name: "day of week",
        min: 0,
        max: 6,
        names: &DAYS,
    },
];

fn value(f: &Field, s: &str) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = f.names.iter().position(|n| *n == lower) {
        return Ok(u32::try_from(i).unwrap_or(0) + f.min);
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number in the {} field", f.name))?;
    if v < f.min || v > f.max {
        return Err(format!(
            "{v} is outside {}–{} in the {} field",
            f.min, f.max, f.name
        ));
    }
    Ok(v)
}

fn check_field(f: &Field, text: &str) -> Result<(), String> {
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        if let Some(step) = step {
            let n: u32 = step
                .parse()
                .map_err(|_| format!("step {step:?} is not a number in the {} field", f.name))?;
            if n == 0 {
                return Err(format!("step 0 in the {} field", f.name));
            }
        }
        if range == "*" || range == "?" {
            continue;
        }
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (value(f, a)?, value(f, b)?),
            None => {
                let v = value(f, range)?;
                (v, if step.is_some() { f.max } else { v })
            }
        };
        if lo > hi {
            return Err(format!(
                "range {range} runs backwards in the {} field",
                f.name
            ));
        }
    }
    Ok(())
}

/// `Ok` for a schedule Kubernetes accepts; otherwise why not, for a condition message.
pub fn validate(schedule: &str) -> Result<(), String> {
    let s = schedule.trim();
    if s.is_empty() {
        return Err("the schedule is empty".into());
    }
    if s.starts_with("TZ=") || s.starts_with("CRON_TZ=") {
        return Err("a time zone in the schedule is not allowed; Kubernetes refuses it".into());
    }
    if s.starts_with('@') {
        if DESCRIPTORS.contains(&s.to_ascii_lowercase().as_str()) || s.starts_with("@every ") {
            return Ok(());
        }
        return Err(format!("unknown descriptor {s:?}"));
    }
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 5 {
        return Err(format!(
            "expected exactly 5 fields (minute hour day-of-month month day-of-week), found {}",
            parts.len()
        ));
    }
    for (f, text) in FIELDS.iter().zip(parts) {
        check_field(f, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_schedules() {
        for ok in [
            "*/5 * * * *",
            "0 0 * * SUN",
            "30 2 1-15/2 jan-jun mon,wed",
            "@daily",
            "@every 1h",
            "0 0 ? * *",
            "5 * * * 6",
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 7",
            "*/0 * * * *",
            "5-1 * * * *",
            "@sometimes",
            "TZ=UTC 0 0 * * *",
            "a * * * *",
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}
