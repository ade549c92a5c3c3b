//! Scenario `kube-sim-list-watch-5000`: list 5,000 objects and deliver one change to 50
//! concurrent watchers over real HTTP. There is no baseline to alternate with (no
//! kube-apiserver runs here), so the figures are compared with the goals.

use serde_json::Map;

use crate::{Outcome, median};

pub async fn run(rounds: usize) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let (mut lists, mut watches) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(3) {
        let r = kube_sim::bench::list_and_watch(5_000, 50).await?;
        lists.push(r.list);
        watches.push(r.watch_all);
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let (list, watch) = (ms(median(&lists)), ms(median(&watches)));
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "median time / goal (no apiserver baseline here)".into(),
    );
    Ok(vec![
        (
            "kube-sim-list-5000",
            Outcome {
                ours: list,
                baseline: 100.0,
                ratio: list / 100.0,
                unit: "ms (median)",
                goal: "<= 1.0 (under 100 ms)".into(),
                met: list <= 100.0,
                notes: notes.clone(),
            },
        ),
        (
            "kube-sim-watch-50-watchers",
            Outcome {
                ours: watch,
                baseline: 50.0,
                ratio: watch / 50.0,
                unit: "ms (median)",
                goal: "<= 1.0 (under 50 ms to all watchers)".into(),
                met: watch <= 50.0,
                notes,
            },
        ),
    ])
}
