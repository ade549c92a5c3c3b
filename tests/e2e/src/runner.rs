//! Runs a suite's scenarios against one environment: stages one after another, the
//! scenarios of a stage at the same time, each in its own namespace; then tears the
//! environment down and checks nothing is left, whatever the scenarios did. nextest runs
//! every test in a process of its own, so one test per suite is what lets the scenarios
//! share one cluster.

use anyhow::{Result, anyhow, bail};
use futures::future::LocalBoxFuture;
use std::time::{Duration, Instant};

use crate::env::Env;
use crate::scenario::Scenario;

/// A scenario takes far less; this only bounds a hang.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(420);

pub type ScenarioFn = for<'a> fn(&'a Scenario<'a>) -> LocalBoxFuture<'a, Result<()>>;

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub run: ScenarioFn,
}

/// `scenario!(deployment_backup)`: the async fn as a [`Case`] named after it.
#[macro_export]
macro_rules! scenario {
    ($f:ident) => {
        $crate::runner::Case {
            name: stringify!($f),
            run: |s| Box::pin($f(s)),
        }
    };
}

/// `STASH_E2E_SCENARIOS=a,b` runs only those scenarios.
fn selected(case: &Case) -> bool {
    match std::env::var("STASH_E2E_SCENARIOS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|n| n.trim() == case.name),
        _ => true,
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn run_case(env: &Env, case: Case) -> Result<Duration> {
    let began = Instant::now();
    let s = Scenario::new(env, case.name);
    s.setup().await?;
    let outcome = match tokio::time::timeout(SCENARIO_TIMEOUT, (case.run)(&s)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("gave up after {}s", SCENARIO_TIMEOUT.as_secs())),
    };
    if let Err(e) = outcome {
        // The failure first: CI keeps only the head of a long report.
        let diagnostics = s.diagnostics().await;
        return Err(anyhow!(
            "{e:#}\n--- namespace {} at the failure:\n{diagnostics}",
            s.ns
        ));
    }
    // Stop what the scenario left running (schedules, ticking pods) before the next ones.
    if std::env::var_os("STASH_E2E_KEEP").is_none() {
        let _ = env
            .kube
            .kubectl(&["delete", "namespace", &s.ns, "--wait=false"])
            .await;
    }
    Ok(began.elapsed())
}

async fn run_stages(
    env: &Env,
    suite: &str,
    stages: &[&[Case]],
) -> Vec<(&'static str, Result<Duration>)> {
    let mut results = Vec::new();
    for stage in stages {
        let cases: Vec<Case> = stage.iter().copied().filter(selected).collect();
        let outcomes = futures::future::join_all(cases.iter().map(|c| run_case(env, *c))).await;
        for (c, r) in cases.iter().zip(outcomes) {
            match &r {
                Ok(d) => eprintln!("[{suite}] scenario {}: ok ({}s)", c.name, d.as_secs()),
                Err(e) => eprintln!("[{suite}] scenario {}: FAILED: {e:#}", c.name),
            }
            results.push((c.name, r));
        }
    }
    results
}

/// Starts the environment, runs the stages, tears down, and fails naming every scenario
/// that failed (and anything teardown left behind).
pub async fn run(suite: &str, stages: &[&[Case]]) -> Result<()> {
    let mut env = Env::start().await?;
    let outcome = tokio::select! {
        r = async {
            env.install().await?;
            eprintln!(
                "[{suite}] environment up in {}s (cluster, S3, chart, agents and operator Ready)",
                env.startup.as_secs()
            );
            anyhow::Ok(run_stages(&env, suite, stages).await)
        } => r,
        sig = interrupted() => Err(anyhow!("interrupted by {sig}")),
    };
    let teardown = env.stop().await;
    let mut failures = Vec::new();
    match outcome {
        Ok(results) => {
            for (name, r) in results {
                if let Err(e) = r {
                    failures.push(format!("scenario {name}: {e:#}"));
                }
            }
        }
        Err(e) => failures.push(format!("{e:#}")),
    }
    match teardown {
        Ok(d) => eprintln!(
            "[{suite}] teardown in {}s, nothing left behind",
            d.as_secs()
        ),
        Err(e) => failures.push(format!("teardown: {e:#}")),
    }
    if !failures.is_empty() {
        bail!(
            "{} failure(s):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}
