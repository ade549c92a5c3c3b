//! `make bench`: runs the scenarios and merges their figures into bench/results/latest.json.

use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The competing workload of the adaptive-budget scenario, a process of its own.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, file] = &args[..]
        && flag == "--competitor"
    {
        return stash_bench::adaptive::competitor(std::path::Path::new(file));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tools = root.join("../.tools/bin");
    let restic = tools.join("restic");
    anyhow::ensure!(restic.exists(), "restic is missing: run `make setup`");
    let data = root.join(".data");
    let results = root.join("results/latest.json");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(15);
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |s: &str| only.is_empty() || only.iter().any(|o| o == s);

    if wanted(stash_bench::snapshots::SCENARIO) {
        let outcome = stash_bench::snapshots::run(&restic, &data, rounds).await?;
        println!(
            "{}: native {:.1} ms, restic {:.1} ms, ratio {:.1} (goal {}){}",
            stash_bench::snapshots::SCENARIO,
            outcome.ours,
            outcome.baseline,
            outcome.ratio,
            outcome.goal,
            if outcome.met { "" } else { " NOT MET" }
        );
        stash_bench::record(&results, stash_bench::snapshots::SCENARIO, &outcome)?;
    }
    if wanted(stash_bench::snapshot_api::SCENARIO) {
        let outcome = stash_bench::snapshot_api::run(&restic, &data, rounds).await?;
        println!(
            "{}: kubectl get snapshots -A {:.1} ms, restic per repository {:.1} ms, ratio {:.1} (goal {}), list at the API server {:.2} ms{}",
            stash_bench::snapshot_api::SCENARIO,
            outcome.ours,
            outcome.baseline,
            outcome.ratio,
            outcome.goal,
            outcome
                .notes
                .get("server_list_ms")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0),
            if outcome.met { "" } else { " NOT MET" }
        );
        stash_bench::record(&results, stash_bench::snapshot_api::SCENARIO, &outcome)?;
    }
    let mut more = Vec::new();
    if wanted("agent") {
        more.extend(stash_bench::agent::run(&data, rounds.min(3)).await?);
    } else if wanted("agent-throughput") {
        more.extend(stash_bench::agent::throughput(&data, rounds.min(5)).await?);
    } else if wanted("agent-budget") {
        more.extend(stash_bench::agent::budget(&data).await?);
    } else if wanted("agent-page-cache") {
        more.extend(stash_bench::agent::page_cache_kept(&data).await?);
    }
    if wanted(stash_bench::incremental::SCENARIO) {
        more.extend(stash_bench::incremental::run(&data).await?);
    }
    if wanted(stash_bench::adaptive::SCENARIO) {
        more.extend(stash_bench::adaptive::run(&data).await?);
    }
    if wanted(stash_bench::restore::SCENARIO) {
        more.extend(stash_bench::restore::run(&data, rounds.min(3)).await?);
    }
    if wanted(stash_bench::operator::SCENARIO) {
        // The operator built next to this binary, so from the same checkout and target dir.
        let operator = std::env::current_exe()?.with_file_name("stash-operator");
        more.extend(stash_bench::operator::run(&restic, &operator, &data).await?);
    }
    if wanted("kube-sim") {
        more.extend(stash_bench::kubesim::run(rounds).await?);
    }
    for (name, outcome) in more {
        println!(
            "{name}: ours {:.3}, baseline {:.3} {}, ratio {:.3} (goal {}){}",
            outcome.ours,
            outcome.baseline,
            outcome.unit,
            outcome.ratio,
            outcome.goal,
            if outcome.met { "" } else { " NOT MET" }
        );
        stash_bench::record(&results, name, &outcome)?;
    }
    println!("results: {}", results.display());
    Ok(())
}
