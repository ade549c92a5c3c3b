//! What a backup costs the node's own workloads: the read latency of a competing process
//! (4 KiB `O_DIRECT` reads at random offsets of a 2 GiB file on the same disk, one every
//! 5 ms, as a database serving a light load does) while nothing else runs, and while a full
//! backup of a 1 GiB volume runs: stock `restic backup` unthrottled, the agent with a fixed
//! budget of 50 MiB/s, and the agent with an adaptive budget (ceiling 200 MiB/s; see the
//! agent's `pressure` module). Both agent runs are in the default read mode (direct). The
//! competitor is a process of its own, in the root cgroup; the agent runs in a cgroup v2
//! directory of its own, as in a pod, so that its own IO waits are told from the workload's.
//! `make bench SCENARIOS=agent-adaptive` runs it alone.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use restic_wrapper::{Backend, Repository, Restic, Secrets};
use serde_json::Map;
use stash_node_agent::budget::{IoBudget, Limits};
use stash_node_agent::engine::{self, BackupRequest, ReadMode};

use crate::Outcome;
use crate::agent::{MIB, evict, restic_bin, stock_backup, xorshift_fill};

pub const SCENARIO: &str = "agent-adaptive";
const PASSWORD: &str = "bench password";
const FIXED: u64 = 50 * MIB;
const CEILING: u64 = 200 * MIB;
/// The competitor's file, and how often it reads.
const COMPETITOR_FILE: u64 = 2 << 30;
const EVERY: Duration = Duration::from_millis(5);
const IDLE: Duration = Duration::from_secs(15);

/// The competing workload, run as `stash-bench --competitor FILE`: reads until its stdin
/// closes, then prints each read's latency in microseconds, one per line.
pub fn competitor(file: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(file)
        .with_context(|| format!("open {} with O_DIRECT", file.display()))?;
    let blocks = f.metadata()?.len() / 4096;
    // O_DIRECT wants an aligned buffer: 4 KiB inside an 8 KiB allocation.
    let mut raw = vec![0u8; 8192];
    let at = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[at..at + 4096];
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = done.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        watcher.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut latencies = Vec::new();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let t = Instant::now();
        f.read_exact_at(buf, (seed % blocks) * 4096)?;
        latencies.push(t.elapsed().as_micros() as u64);
        std::thread::sleep(EVERY);
    }
    let mut out = std::io::stdout().lock();
    for l in latencies {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

/// A running competitor.
struct Competitor(Child);

impl Competitor {
    /// Starts one, outside the agent's cgroup.
    fn start(file: &Path, root_procs: Option<&Path>) -> anyhow::Result<Competitor> {
        let child = Command::new(std::env::current_exe()?)
            .arg("--competitor")
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        if let Some(procs) = root_procs {
            std::fs::write(procs, child.id().to_string())
                .context("move the competitor out of the agent's cgroup")?;
        }
        Ok(Competitor(child))
    }

    /// Stops it: its latencies, sorted.
    fn stop(mut self) -> anyhow::Result<Vec<u64>> {
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "the competitor failed");
        let mut l: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        l.sort_unstable();
        Ok(l)
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// A cgroup v2 directory for this process, as the agent's pod would have: the unified
/// hierarchy's mount, and the root's `cgroup.procs` to move others back to.
fn own_cgroup() -> Option<(PathBuf, PathBuf)> {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").is_file() && p.join("io.pressure").is_file())?;
    let dir = root.join("stash-bench-agent");
    let _ = std::fs::create_dir(&dir);
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).ok()?;
    Some((dir, root.join("cgroup.procs")))
}

fn leave_cgroup(cgroup: &Option<(PathBuf, PathBuf)>) {
    if let Some((dir, root_procs)) = cgroup {
        let _ = std::fs::write(root_procs, std::process::id().to_string());
        let _ = std::fs::remove_dir(dir);
    }
}

/// One backup (or the idle time) with the competitor running beside it.
struct Run {
    /// The competitor's read latencies, sorted (µs).
    latencies: Vec<u64>,
    seconds: f64,
    /// Bytes the backup read.
    bytes: u64,
}

impl Run {
    fn p(&self, p: f64) -> f64 {
        percentile(&self.latencies, p)
    }
}

struct Runs {
    idle: Run,
    restic: Run,
    fixed: Run,
    adaptive: Run,
}

/// The competing workload's latencies during each kind of run, and each run's duration.
pub async fn run(data: &Path) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let volume = crate::restore::dataset(data)?;
    let target = data.join("competitor.bin");
    if std::fs::metadata(&target).map(|m| m.len()).ok() != Some(COMPETITOR_FILE) {
        let mut f = std::fs::File::create(&target)?;
        let mut chunk = vec![0u8; 8 << 20];
        let mut seed = 7u64;
        for _ in 0..COMPETITOR_FILE / chunk.len() as u64 {
            xorshift_fill(&mut chunk, &mut seed);
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    // The repository on the same disk as the volume would compete too; in memory it
    // measures only the reads.
    let scratch = Path::new("/dev/shm/stash-bench-adaptive");
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch)?;
    let repo_path = scratch.join("repo");
    let restic = Restic::new(Repository::new(
        Backend::Local {
            path: repo_path.clone(),
        },
        Secrets::new().with("RESTIC_PASSWORD", PASSWORD),
        scratch,
    )?)
    .with_program(restic_bin());
    restic.init().await?;

    let cgroup = own_cgroup();
    let root_procs = cgroup.as_ref().map(|(_, procs)| procs.as_path());
    let result = measure(&restic, &repo_path, &volume, &target, root_procs).await;
    leave_cgroup(&cgroup);
    let _ = std::fs::remove_dir_all(scratch);
    let runs = result?;

    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "the competing workload's p99 read latency during an adaptive-budget backup / its p99 on an idle node".into(),
    );
    for (name, run) in [
        ("idle", &runs.idle),
        ("restic", &runs.restic),
        ("fixed", &runs.fixed),
        ("adaptive", &runs.adaptive),
    ] {
        notes.insert(format!("{name}_p50_ms"), run.p(0.5).into());
        notes.insert(format!("{name}_p99_ms"), run.p(0.99).into());
        notes.insert(format!("{name}_reads"), run.latencies.len().into());
        if name != "idle" {
            notes.insert(format!("{name}_backup_seconds"), run.seconds.into());
        }
    }
    notes.insert(
        "adaptive_slower_than_unthrottled_restic".into(),
        (runs.adaptive.seconds / runs.restic.seconds).into(),
    );
    notes.insert(
        "adaptive_mean_read_mib_s".into(),
        (runs.adaptive.bytes as f64 / MIB as f64 / runs.adaptive.seconds).into(),
    );
    notes.insert("fixed_budget_mib_s".into(), (FIXED / MIB).into());
    notes.insert("adaptive_ceiling_mib_s".into(), (CEILING / MIB).into());
    notes.insert("agent_in_own_cgroup".into(), cgroup.is_some().into());
    notes.insert(
        "workload".into(),
        "4 KiB O_DIRECT random reads of a 2 GiB file every 5 ms; backups of a 1.03 GiB volume read from disk (page cache dropped), repository in memory; one run each".into(),
    );
    let (ours, idle) = (runs.adaptive.p(0.99), runs.idle.p(0.99));
    let ratio = ours / idle.max(0.001);
    Ok(vec![(
        "agent-adaptive-competitor-p99",
        Outcome {
            ours,
            baseline: idle,
            ratio,
            unit: "ms (p99)",
            goal: "<= 1.2".into(),
            met: ratio <= 1.2,
            notes,
        },
    )])
}

/// The agent's backup of `volume` in the default mode under `node`; the bytes it read.
async fn agent_backup(
    restic: &Restic,
    volume: &Path,
    name: &str,
    node: &IoBudget,
) -> anyhow::Result<u64> {
    // A key of its own each, so no run has a parent.
    let req = BackupRequest {
        host: Some(name.into()),
        key: Some(format!("bench/adaptive/{name}")),
        budget: node.for_assignment(Limits::default()),
        ..BackupRequest::new(volume, ReadMode::Direct)
    };
    Ok(engine::backup(restic, req).await?.bytes)
}

/// A backup of `volume`, from disk, with the competitor reading beside it from start to end.
async fn beside(
    volume: &Path,
    target: &Path,
    root_procs: Option<&Path>,
    backup: impl Future<Output = anyhow::Result<u64>>,
) -> anyhow::Result<Run> {
    evict(volume)?;
    let c = Competitor::start(target, root_procs)?;
    let t = Instant::now();
    let done = backup.await;
    let seconds = t.elapsed().as_secs_f64();
    let latencies = c.stop()?;
    Ok(Run {
        latencies,
        seconds,
        bytes: done?,
    })
}

async fn measure(
    restic: &Restic,
    repo: &Path,
    volume: &Path,
    target: &Path,
    root_procs: Option<&Path>,
) -> anyhow::Result<Runs> {
    let c = Competitor::start(target, root_procs)?;
    tokio::time::sleep(IDLE).await;
    let idle = Run {
        latencies: c.stop()?,
        seconds: IDLE.as_secs_f64(),
        bytes: 0,
    };
    let stock = async {
        stock_backup(repo, volume, None).await?;
        Ok(0)
    };
    let restic_run = beside(volume, target, root_procs, stock).await?;
    let budget = |rate: u64| {
        IoBudget::new(Limits {
            bytes_per_second: Some(rate),
            iops: None,
        })
    };
    let fixed_budget = budget(FIXED);
    let fixed = agent_backup(restic, volume, "fixed", &fixed_budget);
    let fixed = beside(volume, target, root_procs, fixed).await?;
    let node = budget(CEILING);
    let adapting = tokio::spawn(stash_node_agent::pressure::adapt(
        node.clone(),
        stash_node_agent::pressure::PressureFiles::of_this_process(),
        CEILING,
    ));
    let adaptive = agent_backup(restic, volume, "adaptive", &node);
    let adaptive = beside(volume, target, root_procs, adaptive).await;
    adapting.abort();
    Ok(Runs {
        idle,
        restic: restic_run,
        fixed,
        adaptive: adaptive?,
    })
}
