//! The node's IO budget: token buckets on bytes per second and on operations per second,
//! shared by every assignment running on the node. An assignment may bring its own, lower
//! budget; a read then waits for both. Time comes from a clock that tests control.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A source of time, so the arithmetic can be tested without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A token bucket. `rate` tokens arrive per second up to `burst`; taking more than is there
/// leaves the bucket in debt, and the caller waits until the debt is paid. Debt (rather than
/// refusing large requests) lets a 1 MiB read pass a 100 KiB/s budget at the right pace.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        // A tenth of a second of tokens: smooth pacing without long bursts after idling.
        let burst = (rate as f64 / 10.0).max(1.0);
        // Start empty: a full bucket lets every new assignment read a tenth of a second's
        // worth for free, which overshoots the budget measurably on short reads.
        Bucket {
            rate: rate as f64,
            burst,
            tokens: 0.0,
            last: now,
        }
    }

    /// A new rate from now on: what accrued so far at the old rate stays.
    fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate as f64;
        self.burst = (self.rate / 10.0).max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens and says how long to wait before using them.
    fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Limits of one budget; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub bytes_per_second: Option<u64>,
    pub iops: Option<u64>,
}

impl Limits {
    /// The stricter of two limits on each axis: an assignment can only lower the node's.
    pub fn min(self, other: Limits) -> Limits {
        fn lower(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, None) => a,
                (None, b) => b,
            }
        }
        Limits {
            bytes_per_second: lower(self.bytes_per_second, other.bytes_per_second),
            iops: lower(self.iops, other.iops),
        }
    }
}

#[derive(Debug)]
struct Buckets {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
}

impl Buckets {
    fn new(limits: Limits, now: Instant) -> Buckets {
        Buckets {
            bytes: limits
                .bytes_per_second
                .filter(|r| *r > 0)
                .map(|r| Bucket::new(r, now)),
            ops: limits.iops.filter(|r| *r > 0).map(|r| Bucket::new(r, now)),
        }
    }

    fn take(&mut self, bytes: u64, ops: u64, now: Instant) -> Duration {
        let b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(bytes as f64, now));
        let o = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(ops as f64, now));
        b.max(o)
    }
}

/// The node-wide budget. Cheap to clone; clones share the buckets.
#[derive(Clone, Debug)]
pub struct IoBudget {
    node: Arc<Mutex<Buckets>>,
    clock: Arc<dyn Clock>,
    /// The configured limits: the ceiling an adaptive budget never exceeds.
    limits: Limits,
}

impl IoBudget {
    pub fn new(limits: Limits) -> IoBudget {
        IoBudget::with_clock(limits, Arc::new(SystemClock))
    }

    pub fn with_clock(limits: Limits, clock: Arc<dyn Clock>) -> IoBudget {
        let now = clock.now();
        IoBudget {
            node: Arc::new(Mutex::new(Buckets::new(limits, now))),
            clock,
            limits,
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The limits in force now: the configured ones, with the byte rate an adaptive budget
    /// set (see `pressure`).
    pub fn current(&self) -> Limits {
        Limits {
            bytes_per_second: lock(&self.node).bytes.as_ref().map(|b| b.rate as u64),
            ..self.limits
        }
    }

    /// Sets the node's byte rate, within the configured one: every assignment's reads slow
    /// down or speed up from their next charge on. Without a configured byte rate there is
    /// nothing to adapt, and nothing changes.
    pub fn set_bytes_per_second(&self, rate: u64) {
        let Some(ceiling) = self.limits.bytes_per_second else {
            return;
        };
        let rate = rate.clamp(1, ceiling);
        let now = self.clock.now();
        if let Some(bytes) = lock(&self.node).bytes.as_mut() {
            bytes.set_rate(rate, now);
        }
    }

    /// A budget for one assignment: the node's, plus its own stricter limits if any.
    pub fn for_assignment(&self, own: Limits) -> AssignmentBudget {
        let effective = self.limits.min(own);
        let extra = (effective != self.limits)
            .then(|| Mutex::new(Buckets::new(effective, self.clock.now())));
        AssignmentBudget {
            node: self.clone(),
            own: extra.map(Arc::new),
            effective,
        }
    }
}

/// What one assignment reads through.
#[derive(Clone, Debug)]
pub struct AssignmentBudget {
    node: IoBudget,
    own: Option<Arc<Mutex<Buckets>>>,
    effective: Limits,
}

impl AssignmentBudget {
    pub fn unlimited() -> AssignmentBudget {
        IoBudget::new(Limits::default()).for_assignment(Limits::default())
    }

    pub fn limits(&self) -> Limits {
        self.effective
    }

    /// The node's limits now, which this assignment shares with every other.
    pub fn node_limits(&self) -> Limits {
        self.node.current()
    }

    /// Charges a read of `bytes` in `ops` operations and returns how long the caller must wait
    /// before doing it.
    pub fn charge(&self, bytes: u64, ops: u64) -> Duration {
        let now = self.node.clock.now();
        let node_wait = lock(&self.node.node).take(bytes, ops, now);
        let own_wait = self
            .own
            .as_ref()
            .map_or(Duration::ZERO, |own| lock(own).take(bytes, ops, now));
        node_wait.max(own_wait)
    }

    /// Blocks the calling (reader) thread until the read may happen; returns the wait.
    pub fn acquire_blocking(&self, bytes: u64, ops: u64) -> Duration {
        let wait = self.charge(bytes, ops);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        wait
    }
}

/// A rate that is not a positive Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to read {text:?} as a rate per second: {reason}")]
pub struct QuantityError {
    pub text: String,
    pub reason: &'static str,
}

/// Reads a rate written as a Kubernetes quantity (`resource.Quantity`: a signed decimal
/// number, then a binary suffix `Ki`…`Ei`, a decimal one `n u m k M G T P E`, or an exponent
/// `e3`/`E3`), rounded up to a whole number as `Quantity.Value()` does. Zero, negative and
/// sub-unit rates are refused: a budget of 0 would never read (leave it unset for no limit),
/// and `500m` (milli) is almost always a mistyped `500M`.
pub fn parse_rate(text: &str) -> Result<u64, QuantityError> {
    let fail = |reason| QuantityError {
        text: text.to_owned(),
        reason,
    };
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_len = rest
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(fail("not a number such as 50Mi, 1.5Gi, 500M or 2e9"));
    }
    let (mut exp10, exp2): (i64, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        s if s.len() > 1 && (s.starts_with('e') || s.starts_with('E')) => {
            let exp = &s[1..];
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail(
                    "unknown suffix (use Ki, Mi, Gi, k, M, G or an exponent e3)",
                ));
            }
            let exp: i32 = exp
                .parse()
                .map_err(|_| fail("the exponent is out of range"))?;
            (i64::from(exp), 0)
        }
        "K" => return Err(fail("unknown suffix K (use k for 1000 or Ki for 1024)")),
        _ => {
            return Err(fail(
                "unknown suffix (use Ki, Mi, Gi, k, M, G or an exponent e3)",
            ));
        }
    };
    // The digits as one integer times a power of ten, trailing zeros moved into the power.
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    exp10 -= fraction.len() as i64;
    let significant = digits.trim_end_matches('0');
    exp10 += (digits.len() - significant.len()) as i64;
    if significant.is_empty() {
        return Err(fail(
            "a rate of zero would never read; leave it unset for no limit",
        ));
    }
    if negative {
        return Err(fail("a rate cannot be negative"));
    }
    if significant.len() > 18 {
        return Err(fail("more than 18 significant digits"));
    }
    let mantissa: u128 = significant
        .parse::<u128>()
        .map_err(|_| fail("not a number"))?
        << exp2;
    let too_large = || fail("larger than 2^63-1");
    let value = if exp10 >= 0 {
        let scale = u32::try_from(exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .ok_or_else(too_large)?;
        mantissa.checked_mul(scale).ok_or_else(too_large)?
    } else {
        let below_one = fail("less than one per second (m is milli: did you mean M?)");
        let scale = u32::try_from(-exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .ok_or(below_one.clone())?;
        if mantissa < scale {
            return Err(below_one);
        }
        mantissa.div_ceil(scale)
    };
    u64::try_from(value)
        .ok()
        .filter(|v| i64::try_from(*v).is_ok())
        .ok_or_else(too_large)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct FakeClock(Mutex<Instant>);

    impl FakeClock {
        fn advance(&self, d: Duration) {
            *lock(&self.0) += d;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *lock(&self.0)
        }
    }

    fn clock() -> Arc<FakeClock> {
        Arc::new(FakeClock(Mutex::new(Instant::now())))
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_lowered_rate_paces_every_assignment_and_never_exceeds_the_ceiling() {
        let c = clock();
        let node = IoBudget::with_clock(
            Limits {
                bytes_per_second: Some(100 * MIB),
                iops: None,
            },
            c.clone(),
        );
        let a = node.for_assignment(Limits::default());
        // At the ceiling a second of reads costs a second.
        assert_eq!(a.charge(100 * MIB, 0).as_secs(), 1);
        c.advance(Duration::from_secs(1));
        node.set_bytes_per_second(10 * MIB);
        assert_eq!(a.node_limits().bytes_per_second, Some(10 * MIB));
        let wait = a.charge(10 * MIB, 0);
        assert!((0.99..=1.01).contains(&wait.as_secs_f64()), "{wait:?}");
        // Above the ceiling is the ceiling; a budget without a byte rate has nothing to adapt.
        node.set_bytes_per_second(1000 * MIB);
        assert_eq!(node.current().bytes_per_second, Some(100 * MIB));
        let unlimited = IoBudget::new(Limits::default());
        unlimited.set_bytes_per_second(MIB);
        assert_eq!(unlimited.current(), Limits::default());
    }

    #[test]
    fn rates_parse_as_kubernetes_quantities() {
        let table: &[(&str, u64)] = &[
            ("1", 1),
            ("4096", 4096),
            ("1k", 1_000),
            ("500M", 500_000_000),
            ("2G", 2_000_000_000),
            ("1T", 1_000_000_000_000),
            ("1Ki", 1 << 10),
            ("100Mi", 100 << 20),
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            (".5Mi", 1 << 19),
            ("1.Mi", 1 << 20),
            ("+50Mi", 50 << 20),
            ("2e9", 2_000_000_000),
            ("2E9", 2_000_000_000),
            ("1e+3", 1_000),
            ("15e-1", 2),
            ("1500m", 2),
            ("1.5", 2),
            ("000100", 100),
            ("100000000000000000000e-2", 1_000_000_000_000_000_000),
            ("1E", 1_000_000_000_000_000_000),
            ("7Ei", 7 << 60),
        ];
        for (text, want) in table {
            assert_eq!(parse_rate(text), Ok(*want), "{text}");
        }
        let refused: &[(&str, &str)] = &[
            ("", "not a number"),
            ("Mi", "not a number"),
            ("-1Mi", "negative"),
            ("0", "zero"),
            ("0.0Gi", "zero"),
            ("500m", "milli"),
            ("1e-3", "less than one"),
            ("64K", "use k for 1000 or Ki"),
            ("10 parsecs", "unknown suffix"),
            ("1MB", "unknown suffix"),
            ("1e", "unknown suffix"),
            ("1e3.5", "unknown suffix"),
            ("1.2.3", "not a number"),
            ("8Ei", "larger than"),
            ("1e19", "larger than"),
            ("1e99999999999", "out of range"),
            (" 1Mi", "not a number"),
        ];
        for (text, reason) in refused {
            let err = parse_rate(text).expect_err(text);
            assert!(err.to_string().contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn reads_are_paced_to_the_byte_rate() {
        let c = clock();
        let budget = IoBudget::with_clock(
            Limits {
                bytes_per_second: Some(10 * MIB),
                iops: None,
            },
            c.clone(),
        );
        let a = budget.for_assignment(Limits::default());
        // The bucket starts empty: the first read is paid in time too.
        let wait = a.charge(5 * MIB, 1);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // After idling, at most a tenth of a second's worth is free.
        c.advance(Duration::from_secs(10));
        assert_eq!(a.charge(MIB, 1), Duration::ZERO);
        let wait = a.charge(MIB, 1);
        assert!(wait > Duration::ZERO, "the burst is bounded");
        // Over a simulated second of steady reads, the total matches the rate.
        let mut read = 0;
        let mut t = Duration::ZERO;
        c.advance(Duration::from_millis(500));
        while t < Duration::from_secs(10) {
            let w = a.charge(MIB, 1);
            c.advance(w);
            t += w;
            read += MIB;
        }
        let rate = read as f64 / t.as_secs_f64();
        assert!((rate / (10.0 * MIB as f64) - 1.0).abs() < 0.02, "{rate}");
    }

    #[test]
    fn two_assignments_share_the_node_budget() {
        let c = clock();
        let budget = IoBudget::with_clock(
            Limits {
                bytes_per_second: Some(10 * MIB),
                iops: None,
            },
            c.clone(),
        );
        let (a, b) = (
            budget.for_assignment(Limits::default()),
            budget.for_assignment(Limits::default()),
        );
        let mut done = 0;
        let mut elapsed = Duration::ZERO;
        for _ in 0..100 {
            let w = a.charge(MIB, 1).max(b.charge(MIB, 1));
            c.advance(w);
            elapsed += w;
            done += 2 * MIB;
        }
        let rate = done as f64 / elapsed.as_secs_f64();
        assert!((rate / (10.0 * MIB as f64) - 1.0).abs() < 0.05, "{rate}");
    }

    #[test]
    fn an_assignment_can_only_lower_the_limits() {
        let budget = IoBudget::with_clock(
            Limits {
                bytes_per_second: Some(100 * MIB),
                iops: Some(1000),
            },
            clock(),
        );
        let lower = budget.for_assignment(Limits {
            bytes_per_second: Some(20 * MIB),
            iops: None,
        });
        assert_eq!(lower.limits().bytes_per_second, Some(20 * MIB));
        assert_eq!(lower.limits().iops, Some(1000));
        let higher = budget.for_assignment(Limits {
            bytes_per_second: Some(500 * MIB),
            iops: Some(5000),
        });
        assert_eq!(higher.limits(), budget.limits());
    }

    #[test]
    fn iops_are_limited_too() {
        let c = clock();
        let budget = IoBudget::with_clock(
            Limits {
                bytes_per_second: None,
                iops: Some(100),
            },
            c,
        );
        let a = budget.for_assignment(Limits::default());
        let wait = a.charge(4096, 50);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(
            AssignmentBudget::unlimited().charge(u64::MAX / 2, 1 << 40),
            Duration::ZERO
        );
    }
}
