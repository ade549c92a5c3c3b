//! The adaptive IO budget: the node's byte rate lowered while the node's own workloads stall
//! on IO, raised again when they do not, never above the configured ceiling.
//!
//! The signal is Linux pressure stall information: `/proc/pressure/io`'s `some` total is the
//! time, in microseconds, during which at least one task on the node waited for IO. The
//! agent's own waits (its reader, and the restic processes it starts, whose cgroups are
//! below its own) count there too, so the agent's cgroup's `io.pressure` is subtracted: what
//! remains is time during which something else waited while the agent did not, which its
//! reads can only have lengthened. Where the agent has no cgroup of its own (the root cgroup,
//! or no cgroup v2 mount), nothing can be subtracted and every stall on the node counts as
//! the workloads': the budget then yields more than it must, never less.
//!
//! A workload's IO waits are not all the agent's doing: a database reading from disk stalls
//! a little on an idle node too. So the agent learns what the rest of the node stalls on
//! its own: every [`PROBE_EVERY`] intervals it reads at the floor rate for two intervals, and
//! takes the second one's stall as the baseline. In between, the rate follows additive
//! increase, multiplicative decrease, as TCP's congestion control does: halved after an
//! interval in which the workloads stalled markedly more than the baseline
//! ([`HIGH_FACTOR`] of it, plus [`HIGH_MARGIN`]), raised by a tenth of the ceiling after one
//! in which they stalled hardly more ([`LOW_FACTOR`], [`LOW_MARGIN`]), held in between, and
//! never below [`FLOOR`] of the ceiling, so a backup on a node that is never idle still
//! finishes. A backup starts with a probe, at the floor, and ramps up from there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::budget::IoBudget;

/// Stalls above `baseline * HIGH_FACTOR + HIGH_MARGIN` halve the rate.
pub const HIGH_FACTOR: f64 = 1.5;
pub const HIGH_MARGIN: f64 = 0.005;
/// Stalls below `baseline * LOW_FACTOR + LOW_MARGIN` let it grow.
pub const LOW_FACTOR: f64 = 1.2;
pub const LOW_MARGIN: f64 = 0.002;
/// The lowest rate, as a fraction of the ceiling: the rate while probing, too.
pub const FLOOR: f64 = 0.05;
/// How often pressure is read and the rate set.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// Intervals from one probe to the next (15 s): two of them at the floor.
pub const PROBE_EVERY: u64 = 30;

/// The `some` line's `total=` of a PSI file: microseconds during which at least one task
/// stalled.
pub fn some_total(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The rate controller, separate from time and files so its arithmetic can be tested.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    ceiling: u64,
    rate: u64,
    /// The rate to go back to after a probe.
    resume: u64,
    /// The workloads' stall fraction with the agent at the floor, from the last probe.
    baseline: f64,
    /// Intervals measured so far.
    tick: u64,
}

impl Adaptive {
    /// Starts with a probe, at the floor.
    pub fn new(ceiling: u64) -> Adaptive {
        let floor = Self::floor_of(ceiling);
        Adaptive {
            ceiling,
            rate: floor,
            resume: floor,
            baseline: 0.0,
            tick: 0,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn baseline(&self) -> f64 {
        self.baseline
    }

    fn floor_of(ceiling: u64) -> u64 {
        ((ceiling as f64 * FLOOR) as u64).max(1)
    }

    /// The rate for the next interval, after one in which the workloads stalled `stall` of
    /// the time.
    pub fn step(&mut self, stall: f64) -> u64 {
        let floor = Self::floor_of(self.ceiling);
        let phase = self.tick % PROBE_EVERY;
        self.tick += 1;
        match phase {
            // The first interval at the floor lets reads paced at the old rate drain.
            0 => {}
            // The second is the workloads' own.
            1 => {
                self.baseline = stall;
                self.rate = self.resume;
            }
            _ if stall > self.baseline * HIGH_FACTOR + HIGH_MARGIN => {
                self.rate = (self.rate / 2).max(floor);
            }
            _ if stall < self.baseline * LOW_FACTOR + LOW_MARGIN => {
                self.rate = self
                    .rate
                    .saturating_add((self.ceiling / 10).max(1))
                    .min(self.ceiling);
            }
            _ => {}
        }
        if self.tick.is_multiple_of(PROBE_EVERY) {
            self.resume = self.rate;
            self.rate = floor;
        }
        self.rate
    }
}

/// Where the stalls are read from.
#[derive(Clone, Debug)]
pub struct PressureFiles {
    pub node: PathBuf,
    /// The agent's own cgroup's `io.pressure`, when it has a cgroup of its own.
    pub own: Option<PathBuf>,
}

impl PressureFiles {
    /// This node's: `/proc/pressure/io`, and the `io.pressure` of the cgroup v2 directory
    /// `/proc/self/cgroup` names, below the unified hierarchy's mount.
    pub fn of_this_process() -> PressureFiles {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(str::to_owned)
            })
            .filter(|path| path != "/")
            .and_then(|path| {
                ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                    .into_iter()
                    .map(|mount| Path::new(mount).join(path.trim_start_matches('/')))
                    .map(|dir| dir.join("io.pressure"))
                    .find(|file| file.is_file())
            });
        PressureFiles {
            node: PathBuf::from("/proc/pressure/io"),
            own,
        }
    }

    /// The node's and the agent's stall totals, in microseconds.
    fn read(&self) -> Option<(u64, u64)> {
        let node = some_total(&std::fs::read_to_string(&self.node).ok()?)?;
        let own = match &self.own {
            Some(own) => some_total(&std::fs::read_to_string(own).ok()?)?,
            None => 0,
        };
        Some((node, own))
    }
}

/// Sets `budget`'s node rate from the workloads' stalls every [`INTERVAL`], until dropped.
/// Direct-mode restic runs follow through their cgroups (`cgroup::set_node_rate`).
pub async fn adapt(budget: IoBudget, files: PressureFiles, ceiling: u64) {
    let mut control = Adaptive::new(ceiling);
    let Some(mut last) = files.read() else {
        tracing::warn!(file = %files.node.display(),
            "no IO pressure information: the budget stays at its ceiling");
        return;
    };
    let apply = |rate: u64| {
        budget.set_bytes_per_second(rate);
        crate::cgroup::set_node_rate(Some(rate));
    };
    apply(control.rate());
    let mut at = Instant::now();
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(now) = files.read() else { continue };
        let elapsed = at.elapsed().as_micros().max(1) as f64;
        let theirs = now.0.saturating_sub(last.0) as f64 - now.1.saturating_sub(last.1) as f64;
        let stall = (theirs / elapsed).clamp(0.0, 1.0);
        (last, at) = (now, Instant::now());
        let before = control.rate();
        let rate = control.step(stall);
        if rate != before {
            tracing::debug!(
                stall,
                rate,
                baseline = control.baseline(),
                "IO budget adapted to the node's pressure"
            );
            apply(rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_totals_are_read() {
        let text = "some avg10=0.04 avg60=0.44 avg300=0.55 total=14978754\n\
                    full avg10=0.00 avg60=0.23 avg300=0.33 total=8923301\n";
        assert_eq!(some_total(text), Some(14_978_754));
        assert_eq!(some_total("full avg10=0 total=5\n"), None);
        assert_eq!(some_total(""), None);
    }

    #[test]
    fn the_rate_probes_then_follows_the_stalls_against_the_baseline() {
        let mut c = Adaptive::new(1000);
        // The probe: at the floor, the second interval's stall is the baseline.
        assert_eq!(c.rate(), 50);
        assert_eq!(c.step(0.30), 50);
        assert_eq!(c.step(0.04), 50);
        assert_eq!(c.baseline(), 0.04);
        // Hardly above the baseline: grow by tenths of the ceiling.
        assert_eq!(c.step(0.045), 150);
        assert_eq!(c.step(0.04), 250);
        // Between the thresholds the rate holds; markedly above, it halves.
        assert_eq!(c.step(0.058), 250);
        assert_eq!(c.step(0.08), 125);
        // Never below the floor, however long the stalls last.
        for _ in 0..5 {
            c.step(1.0);
        }
        assert_eq!(c.rate(), 50);
        // Calm intervals bring it back up to the ceiling and no further.
        for _ in 0..18 {
            c.step(0.0);
        }
        assert_eq!(c.rate(), 1000);
        // Every PROBE_EVERY intervals the next probe starts, and the rate resumes after it.
        assert_eq!(c.tick, PROBE_EVERY - 1);
        assert_eq!(c.step(0.0), 50);
        assert_eq!(c.step(0.5), 50);
        assert_eq!(c.step(0.01), 1000);
        assert_eq!(c.baseline(), 0.01);
    }

    #[test]
    fn files_that_are_missing_make_pressure_unavailable() {
        let files = PressureFiles {
            node: PathBuf::from("/nonexistent/pressure"),
            own: None,
        };
        assert!(files.read().is_none());
    }
}
