//! Cron schedules as the CronJob validation parses them (robfig/cron's standard parser: five
//! fields or a descriptor), so a bad schedule is refused with the parser's own message.

/// Checks a schedule; the error is the parser's message.
pub fn check(schedule: &str) -> Result<(), String> {
    let s = schedule.trim();
    if s.is_empty() {
        return Err("empty spec string".into());
    }
    if let Some(rest) = s.strip_prefix('@') {
        return match rest {
            "yearly" | "annually" | "monthly" | "weekly" | "daily" | "midnight" | "hourly" => {
                Ok(())
            }
            _ if rest.starts_with("every ") => {
                let d = rest.trim_start_matches("every ").trim();
                if go_duration_ok(d) {
                    Ok(())
                } else {
                    Err(format!(
                        "failed to parse duration @every {d}: time: invalid duration \"{d}\""
                    ))
                }
            }
            _ => Err(format!("unrecognized descriptor: {s}")),
        };
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "expected exactly 5 fields, found {}: [{}]",
            fields.len(),
            fields.join(" ")
        ));
    }
    const MONTHS: &[&str] = &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let bounds: [(u32, u32, &[&str], u32); 5] = [
        (0, 59, &[], 0),
        (0, 23, &[], 0),
        (1, 31, &[], 0),
        (1, 12, MONTHS, 1),
        (0, 6, DAYS, 0),
    ];
    for (field, (min, max, names, base)) in fields.iter().zip(bounds) {
        for expr in field.split(',') {
            range(expr, min, max, names, base)?;
        }
    }
    Ok(())
}

fn number(s: &str, names: &[&str], base: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32 + base);
    }
    s.parse::<u32>().map_err(|_| {
        format!("failed to parse int from {s}: strconv.Atoi: parsing {s:?}: invalid syntax")
    })
}

fn range(expr: &str, min: u32, max: u32, names: &[&str], base: u32) -> Result<(), String> {
    let (range, step) = match expr.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (expr, None),
    };
    let (start, end) = if range == "*" || range == "?" {
        (min, max)
    } else {
        match range.split_once('-') {
            Some((a, b)) => (number(a, names, base)?, number(b, names, base)?),
            None => {
                let n = number(range, names, base)?;
                (n, n)
            }
        }
    };
    if let Some(st) = step {
        let st = number(st, &[], 0)?;
        if st == 0 {
            return Err(format!("step of range should be a positive number: {expr}"));
        }
    }
    if start < min {
        return Err(format!(
            "beginning of range ({start}) below minimum ({min}): {expr}"
        ));
    }
    if end > max {
        return Err(format!(
            "end of range ({end}) above maximum ({max}): {expr}"
        ));
    }
    if start > end {
        return Err(format!(
            "beginning of range ({start}) beyond end of range ({end}): {expr}"
        ));
    }
    Ok(())
}

/// A Go `time.ParseDuration` string: numbers with units ns, us, µs, ms, s, m, h.
fn go_duration_ok(d: &str) -> bool {
    let mut rest = d;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return false;
        }
        rest = &rest[n..];
        let unit = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .iter()
            .filter(|u| rest.starts_with(**u))
            .max_by_key(|u| u.len());
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_like_robfig_cron() {
        assert!(check("*/5 * * * *").is_ok());
        assert!(check("0 3 * * mon-fri").is_ok());
        assert!(check("@daily").is_ok());
        assert!(check("@every 1h30m").is_ok());
        assert_eq!(
            check("not a cron").unwrap_err(),
            "expected exactly 5 fields, found 3: [not a cron]"
        );
        assert_eq!(
            check("61 * * * *").unwrap_err(),
            "end of range (61) above maximum (59): 61"
        );
        assert!(
            check("x * * * *")
                .unwrap_err()
                .starts_with("failed to parse int from x")
        );
    }
}
