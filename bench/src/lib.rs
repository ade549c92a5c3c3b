//! The benchmark harness: each scenario runs ours and the baseline alternately in one run,
//! so both see the same machine noise, and reports medians and their ratio. Results are
//! merged into `bench/results/latest.json`, one entry per scenario.

pub mod adaptive;
pub mod agent;
pub mod incremental;
pub mod kubesim;
pub mod operator;
pub mod restore;
pub mod snapshot_api;
pub mod snapshots;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

/// One scenario's figures, as written to `latest.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub ours: f64,
    pub baseline: f64,
    /// How the two compare, in the direction the goal is stated.
    pub ratio: f64,
    pub unit: &'static str,
    /// The goal for `ratio`, for example ">= 20".
    pub goal: String,
    pub met: bool,
    /// Anything else worth reading next to the figures.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub notes: Map<String, Value>,
}

/// Times `ours` and `baseline` alternately, `rounds` times each, after one warm-up of each.
pub async fn alternate<A, B, FA, FB>(
    rounds: usize,
    mut ours: A,
    mut baseline: B,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)>
where
    A: FnMut() -> FA,
    B: FnMut() -> FB,
    FA: Future<Output = anyhow::Result<()>>,
    FB: Future<Output = anyhow::Result<()>>,
{
    ours().await?;
    baseline().await?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        ours().await?;
        a.push(t.elapsed());
        let t = Instant::now();
        baseline().await?;
        b.push(t.elapsed());
    }
    Ok((a, b))
}

pub fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// Merges one scenario into the results file, keeping the others' latest figures.
pub fn record(results: &Path, scenario: &str, outcome: &Outcome) -> anyhow::Result<()> {
    let mut all: Map<String, Value> = std::fs::read(results)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    all.insert(scenario.to_owned(), serde_json::to_value(outcome)?);
    if let Some(dir) = results.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(results, serde_json::to_string_pretty(&all)? + "\n")?;
    Ok(())
}
