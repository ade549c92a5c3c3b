//! The node agent against stock `restic backup` on one generated dataset (1 GiB of large
//! files plus 20,000 files of 8 KiB), alternating the two in one run:
//! full-backup throughput in stream and direct mode, an unchanged volume, budget accuracy
//! alone and shared, page cache left behind by a stream backup, and the agent's memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use restic_wrapper::{Backend, Repository, Restic, Secrets};
use serde_json::{Map, Value};
use stash_node_agent::budget::{AssignmentBudget, IoBudget, Limits};
use stash_node_agent::engine::{self, BackupRequest, ReadMode};

use crate::{Outcome, median};

const PASSWORD: &str = "bench password";
pub(crate) const MIB: u64 = 1 << 20;

pub(crate) fn xorshift_fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let bytes = seed.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// The dataset, generated once: `large/` 4 × 256 MiB, `small/` 20,000 × 8 KiB, and
/// `budget/` 128 MiB for the pacing scenarios.
pub fn dataset(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("agent-volume");
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut buf = vec![0u8; 8 << 20];
    let mut write_big = |path: &Path, size: u64, seed: &mut u64| -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            xorshift_fill(&mut buf[..n], seed);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    };
    std::fs::create_dir_all(root.join("large"))?;
    for i in 0..4 {
        write_big(&root.join(format!("large/file-{i}")), 256 * MIB, &mut seed)?;
    }
    std::fs::create_dir_all(root.join("budget"))?;
    write_big(&root.join("budget/one"), 128 * MIB, &mut seed)?;
    let mut small = vec![0u8; 8192];
    for i in 0..20_000 {
        let d = root.join(format!("small/{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&d)?;
        }
        xorshift_fill(&mut small, &mut seed);
        std::fs::write(d.join(format!("f{i}")), &small)?;
    }
    std::fs::write(root.join(".complete"), b"")?;
    Ok(root)
}

pub(crate) fn fresh_repo(scratch: &Path, name: &str) -> anyhow::Result<Restic> {
    let path = scratch.join(name);
    let _ = std::fs::remove_dir_all(&path);
    let repo = Repository::new(
        Backend::Local { path },
        Secrets::new().with("RESTIC_PASSWORD", PASSWORD),
        scratch,
    )?;
    Ok(Restic::new(repo))
}

pub(crate) fn restic_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/restic")
}

pub(crate) async fn stock_backup(
    repo: &Path,
    dir: &Path,
    cache: Option<&Path>,
) -> anyhow::Result<Duration> {
    let mut cmd = tokio::process::Command::new(restic_bin());
    cmd.args(["backup", "--json", "-q", "."])
        .current_dir(dir)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PASSWORD);
    match cache {
        Some(c) => cmd.env("RESTIC_CACHE_DIR", c),
        None => cmd.arg("--no-cache"),
    };
    let t = Instant::now();
    let out = cmd.output().await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(t.elapsed())
}

pub(crate) fn request(path: &Path, mode: ReadMode, budget: AssignmentBudget) -> BackupRequest {
    BackupRequest {
        host: Some("host-0".into()),
        key: Some("bench/volume".into()),
        budget,
        ..BackupRequest::new(path, mode)
    }
}

pub(crate) fn outcome(
    ours: f64,
    baseline: f64,
    ratio: f64,
    unit: &'static str,
    goal: &str,
    met: bool,
    notes: Map<String, Value>,
) -> Outcome {
    Outcome {
        ours,
        baseline,
        ratio,
        unit,
        goal: goal.to_owned(),
        met,
        notes,
    }
}

/// Reads every file of the volume, so each measured backup starts from the same page cache:
/// all of the volume cached. (A stream backup drops what it read, which would otherwise make
/// whichever command runs after it read from disk.)
fn warm(dir: &Path) -> anyhow::Result<()> {
    let mut all = Vec::new();
    files(dir, &mut all)?;
    let mut buf = vec![0u8; 1 << 20];
    for f in all {
        let mut file = std::fs::File::open(&f)?;
        while std::io::Read::read(&mut file, &mut buf)? > 0 {}
    }
    Ok(())
}

/// Where the benchmark's repositories go: memory when the machine has a tmpfs, so what is
/// compared is the two read paths and not the disk's writeback of earlier rounds' packs (on
/// a slow disk that throttled whichever command ran next).
pub(crate) fn scratch(data: &Path) -> anyhow::Result<PathBuf> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.join("stash-bench-agent")
    } else {
        data.join("agent-scratch")
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Every agent scenario, by name.
pub async fn run(data: &Path, rounds: usize) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let mut results = throughput(data, rounds).await?;
    results.extend(others(data, rounds).await?);
    results.extend(page_cache_kept(data).await?);
    Ok(results)
}

/// Full-backup throughput in both modes against stock restic
/// (`make bench SCENARIOS=agent-throughput`).
pub async fn throughput(
    data: &Path,
    rounds: usize,
) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let volume = dataset(data)?;
    let scratch = scratch(data)?;
    let size: u64 = walk_size(&volume)?;
    let mut results = Vec::new();

    // Full backups into fresh repositories: restic, then the agent in each mode, per round,
    // each from a fully cached volume.
    let (mut stock, mut stream, mut direct, mut kdf) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // What opening a repository the agent has never seen costs (scrypt), timed on a
        // repository of its own so the measured backups below stay cold.
        let probe = fresh_repo(&scratch, "probe")?.with_program(restic_bin());
        probe.init().await?;
        let t = Instant::now();
        restic_wrapper::NativeRepository::open(
            probe.repository().backend(),
            probe.repository().secrets(),
        )
        .await?;
        kdf.push(t.elapsed());
        let base = fresh_repo(&scratch, "stock")?;
        base.with_program(restic_bin()).init().await?;
        warm(&volume)?;
        stock.push(stock_backup(&scratch.join("stock"), &volume, None).await?);
        // Each mode goes first in every other round, so neither always follows the other.
        let mut modes = [
            (ReadMode::Stream, &mut stream),
            (ReadMode::Direct, &mut direct),
        ];
        if round % 2 == 1 {
            modes.reverse();
        }
        for (mode, samples) in modes {
            let restic = fresh_repo(&scratch, "ours")?.with_program(restic_bin());
            restic.init().await?;
            warm(&volume)?;
            let t = Instant::now();
            let r = engine::backup(
                &restic,
                request(&volume, mode, AssignmentBudget::unlimited()),
            )
            .await?;
            ensure!(!r.unchanged && r.snapshot_id.is_some());
            samples.push(t.elapsed());
        }
    }
    let (s, st, d) = (median(&stock), median(&stream), median(&direct));
    let key = median(&kdf);
    let mbps = |t: Duration| size as f64 / MIB as f64 / t.as_secs_f64();
    let mut notes = Map::new();
    notes.insert("dataset_mib".into(), (size / MIB).into());
    notes.insert("rounds".into(), rounds.into());
    notes.insert(
        "ratio_meaning".into(),
        "agent throughput / restic throughput".into(),
    );
    // A first backup into an empty repository needs no key in the agent's process. A new
    // volume in a repository with snapshots does, once per repository and process: what the
    // ratio would be if every round paid that, from the derivation timed on its own.
    notes.insert(
        "first_open_key_derivation_ms".into(),
        (key.as_secs_f64() * 1e3).into(),
    );
    notes.insert("repositories".into(), scratch.display().to_string().into());
    let paying = |ours: Duration| s.as_secs_f64() / (ours + key).as_secs_f64();
    let mut stream_notes = notes.clone();
    stream_notes.insert(
        "ratio_if_the_key_is_derived_first".into(),
        paying(st).into(),
    );
    notes.insert("ratio_if_the_key_is_derived_first".into(), paying(d).into());
    let ratio = s.as_secs_f64() / st.as_secs_f64();
    results.push((
        "agent-stream-full-backup-throughput",
        outcome(
            mbps(st),
            mbps(s),
            ratio,
            "MiB/s (median)",
            ">= 0.9",
            ratio >= 0.9,
            stream_notes,
        ),
    ));
    let ratio = s.as_secs_f64() / d.as_secs_f64();
    results.push((
        "agent-direct-full-backup-throughput",
        outcome(
            mbps(d),
            mbps(s),
            ratio,
            "MiB/s (median)",
            ">= 0.98",
            ratio >= 0.98,
            notes,
        ),
    ));
    // The repositories live in memory: give it back.
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(results)
}

/// The unchanged volume, budget accuracy, page cache and memory scenarios.
async fn others(data: &Path, rounds: usize) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let volume = dataset(data)?;
    let scratch = scratch(data)?;
    let mut results = Vec::new();

    // An unchanged volume: the agent's statx walk and snapshot lookup against restic's own
    // incremental backup (with its cache, its best case).
    let ours_repo = fresh_repo(&scratch, "unchanged-ours")?.with_program(restic_bin());
    ours_repo.init().await?;
    engine::backup(
        &ours_repo,
        request(&volume, ReadMode::Stream, AssignmentBudget::unlimited()),
    )
    .await?;
    let stock_repo = scratch.join("unchanged-stock");
    let _ = std::fs::remove_dir_all(&stock_repo);
    fresh_repo(&scratch, "unchanged-stock")?
        .with_program(restic_bin())
        .init()
        .await?;
    let cache = scratch.join("unchanged-cache");
    stock_backup(&stock_repo, &volume, Some(&cache)).await?;
    let (mut ours, mut theirs) = (vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let r = engine::backup(
            &ours_repo,
            request(&volume, ReadMode::Stream, AssignmentBudget::unlimited()),
        )
        .await?;
        ensure!(r.unchanged, "the unchanged volume was read again");
        ours.push(t.elapsed());
        theirs.push(stock_backup(&stock_repo, &volume, Some(&cache)).await?);
    }
    let (o, t) = (median(&ours), median(&theirs));
    let ratio = o.as_secs_f64() / t.as_secs_f64();
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "agent time / restic incremental time".into(),
    );
    results.push((
        "agent-unchanged-volume",
        outcome(
            o.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3,
            ratio,
            "ms (median)",
            "<= 0.1",
            ratio <= 0.1,
            notes,
        ),
    ));

    results.extend(budget(data).await?);
    // Through restic too, for reference: there the consumer may be the limit.
    let budget_dir = volume.join("budget");
    let budget_bytes = walk_size(&budget_dir)?;
    {
        let restic = fresh_repo(&scratch, "budget")?.with_program(restic_bin());
        restic.init().await?;
        let node = IoBudget::new(Limits {
            bytes_per_second: Some(100 * MIB),
            iops: None,
        });
        let r = engine::backup(
            &restic,
            request(
                &budget_dir,
                ReadMode::Stream,
                node.for_assignment(Limits::default()),
            ),
        )
        .await?;
        let measured = budget_bytes as f64 / r.read_seconds.context("no read time")? / MIB as f64;
        let mut notes = Map::new();
        notes.insert(
            "ratio_meaning".into(),
            "read rate of a full stream backup / 100 MiB/s budget (restic consuming)".into(),
        );
        results.push((
            "agent-budget-through-restic-100mib",
            outcome(
                measured,
                100.0,
                measured / 100.0,
                "MiB/s",
                "informational",
                true,
                notes,
            ),
        ));
    }

    // Page cache: evict the volume's pages, back it up, count what is cached again.
    evict(&volume)?;
    let before = cached_bytes(&volume)?;
    let restic = fresh_repo(&scratch, "cache")?.with_program(restic_bin());
    restic.init().await?;
    let r = engine::backup(
        &restic,
        request(&volume, ReadMode::Stream, AssignmentBudget::unlimited()),
    )
    .await?;
    let after = cached_bytes(&volume)?;
    let grown = after.saturating_sub(before) as f64;
    let ratio = grown / r.bytes as f64;
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "volume pages cached after a stream backup / bytes read (fincore)".into(),
    );
    notes.insert("cached_before_bytes".into(), before.into());
    results.push((
        "agent-page-cache-growth",
        outcome(
            grown / MIB as f64,
            r.bytes as f64 / MIB as f64,
            ratio,
            "MiB",
            "<= 0.05",
            ratio <= 0.05,
            notes,
        ),
    ));

    // The same in direct mode: restic reads, and its cgroup's page cache is dropped after.
    evict(&volume)?;
    let restic = fresh_repo(&scratch, "cache-direct")?.with_program(restic_bin());
    restic.init().await?;
    let r = engine::backup(
        &restic,
        request(&volume, ReadMode::Direct, AssignmentBudget::unlimited()),
    )
    .await?;
    let grown = cached_bytes(&volume)?.saturating_sub(before) as f64;
    let read = r
        .storage_read_bytes
        .context("restic's reads were not counted")? as f64;
    let ratio = grown / read.max(1.0);
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "volume pages cached after a direct backup / bytes restic read from the disk".into(),
    );
    results.push((
        "agent-direct-page-cache-growth",
        outcome(
            grown / MIB as f64,
            read / MIB as f64,
            ratio,
            "MiB",
            "<= 0.05",
            ratio <= 0.05,
            notes,
        ),
    ));

    // The agent's resident memory while streaming the whole volume, sampled from /proc.
    let rss = agent_peak_rss(&volume, &scratch)?;
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "agent peak RSS / 64 MiB goal (restic's own memory not included)".into(),
    );
    results.push((
        "agent-streaming-memory",
        outcome(
            rss as f64 / MIB as f64,
            64.0,
            rss as f64 / (64 * MIB) as f64,
            "MiB",
            "<= 1.0",
            rss <= 64 * MIB,
            notes,
        ),
    ));

    // The repositories live in memory: give it back.
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(results)
}

/// Writes `chunks` × 8 MiB of pseudo-random data from `seed` to `path`, on disk.
fn random_file(path: &Path, chunks: usize, mut seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut buf = vec![0u8; 8 << 20];
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for _ in 0..chunks {
        xorshift_fill(&mut buf, &mut seed);
        f.write_all(&buf)?;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// A volume with a workload's working set: `hot/data` (200 MiB, which the benchmark reads
/// into the page cache before each backup, as a database would keep it) beside `cold/data`
/// (200 MiB, not cached).
fn hot_volume(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("agent-hot-volume");
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    for (name, seed) in [
        ("hot", 0x2545_f491_4f6c_dd1d_u64),
        ("cold", 0x5851_f42d_4c95_7f2d),
    ] {
        std::fs::create_dir_all(root.join(name))?;
        random_file(&root.join(name).join("data"), 25, seed)?;
    }
    std::fs::write(root.join(".complete"), b"")?;
    Ok(root)
}

/// A workload's cached working set after a backup of its volume
/// (`make bench SCENARIOS=agent-page-cache`): how much of it is still cached, and how much
/// of what was not cached the backup left behind, for a stream backup and for stock restic.
pub async fn page_cache_kept(data: &Path) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let volume = hot_volume(data)?;
    let scratch = scratch(data)?;
    let (hot, cold) = (volume.join("hot"), volume.join("cold"));
    let size = std::fs::metadata(hot.join("data"))?.len();
    // Before each backup: the hot file wholly cached, the cold one not at all.
    let prepare = || -> anyhow::Result<()> {
        evict(&volume)?;
        warm(&hot)?;
        ensure!(
            cached_bytes(&hot)? >= size * 99 / 100,
            "the working set could not be cached"
        );
        ensure!(cached_bytes(&cold)? == 0, "the cold file stayed cached");
        Ok(())
    };
    let mut ours = Vec::new();
    let mut took = std::time::Duration::ZERO;
    for (mode, repo) in [
        (ReadMode::Stream, "kept"),
        (ReadMode::Direct, "kept-direct"),
    ] {
        prepare()?;
        let restic = fresh_repo(&scratch, repo)?.with_program(restic_bin());
        restic.init().await?;
        let t = Instant::now();
        let r = engine::backup(
            &restic,
            request(&volume, mode, AssignmentBudget::unlimited()),
        )
        .await?;
        ensure!(r.mode == Some(mode), "read in {:?}, not {mode:?}", r.mode);
        took = took.max(t.elapsed());
        ours.push((
            mode,
            cached_bytes(&hot)? as f64 / size as f64,
            cached_bytes(&cold)?,
        ));
    }
    // A control: what the machine itself evicts from a freshly cached file in as long (a
    // proactive reclaimer such as DAMON's pageout takes pages nobody read).
    prepare()?;
    tokio::time::sleep(took).await;
    let idle = cached_bytes(&hot)? as f64 / size as f64;
    prepare()?;
    let stock_repo = scratch.join("kept-stock");
    fresh_repo(&scratch, "kept-stock")?
        .with_program(restic_bin())
        .init()
        .await?;
    stock_backup(&stock_repo, &volume, None).await?;
    let theirs = (
        cached_bytes(&hot)? as f64 / size as f64,
        cached_bytes(&cold)?,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(ours
        .into_iter()
        .map(|(mode, kept, cold_left)| {
            let mut notes = Map::new();
            notes.insert(
                "ratio_meaning".into(),
                format!(
                    "fraction of a cached 200 MiB working set still cached after a {} backup \
                     of its volume (fincore); baseline: after stock restic's backup",
                    mode_name(mode)
                )
                .into(),
            );
            notes.insert("kept_idle_for_as_long".into(), idle.into());
            notes.insert(
                "cold_left_cached_per_byte_ours".into(),
                (cold_left as f64 / size as f64).into(),
            );
            notes.insert(
                "cold_left_cached_per_byte_restic".into(),
                (theirs.1 as f64 / size as f64).into(),
            );
            let name = match mode {
                ReadMode::Stream => "agent-page-cache-kept",
                ReadMode::Direct => "agent-direct-page-cache-kept",
            };
            (
                name,
                outcome(
                    kept * 100.0,
                    theirs.0 * 100.0,
                    kept,
                    "% of the working set cached",
                    ">= 0.95",
                    kept >= 0.95,
                    notes,
                ),
            )
        })
        .collect())
}

pub(crate) fn mode_name(mode: ReadMode) -> &'static str {
    match mode {
        ReadMode::Stream => "stream",
        ReadMode::Direct => "direct",
    }
}

/// Streams a directory through the agent's reader into a sink; returns the reader's time.
async fn read_into_sink(dir: &Path, budget: AssignmentBudget) -> anyhow::Result<f64> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let (engine, _) = stash_node_agent::uring::choose(true);
        let reader = stash_node_agent::stream::VolumeReader {
            root: dir,
            budget,
            engine,
            progress: Default::default(),
            skip_unreadable: false,
            excludes: Default::default(),
            paths: vec![],
        };
        let (report, _) = reader.run(std::io::sink())?;
        Ok(report.seconds)
    })
    .await?
}

/// Budget accuracy alone (`make bench SCENARIOS=agent-budget`): the reader's own rate into
/// a sink, so restic's speed on this machine does not cap what is measured; one reader
/// alone, then two sharing one node budget.
pub async fn budget(data: &Path) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let volume = dataset(data)?;
    let mut results = Vec::new();
    let budget_dir = volume.join("budget");
    let budget_bytes = walk_size(&budget_dir)?;
    for rate_mib in [20u64, 100] {
        let node = IoBudget::new(Limits {
            bytes_per_second: Some(rate_mib * MIB),
            iops: None,
        });
        let seconds = read_into_sink(&budget_dir, node.for_assignment(Limits::default())).await?;
        let measured = budget_bytes as f64 / seconds / MIB as f64;
        let name = if rate_mib == 20 {
            "agent-budget-accuracy-20mib"
        } else {
            "agent-budget-accuracy-100mib"
        };
        let mut notes = Map::new();
        notes.insert(
            "ratio_meaning".into(),
            "measured read rate / configured budget (reader into a sink)".into(),
        );
        results.push((name, rate_outcome(measured, rate_mib as f64, notes)));
    }
    {
        let node = IoBudget::new(Limits {
            bytes_per_second: Some(100 * MIB),
            iops: None,
        });
        let (a, b) = tokio::join!(
            read_into_sink(&budget_dir, node.for_assignment(Limits::default())),
            read_into_sink(&budget_dir, node.for_assignment(Limits::default()))
        );
        let seconds = a?.max(b?);
        let measured = 2.0 * budget_bytes as f64 / seconds / MIB as f64;
        let mut notes = Map::new();
        notes.insert(
            "ratio_meaning".into(),
            "combined read rate of two concurrent readers / node budget".into(),
        );
        results.push((
            "agent-budget-accuracy-shared",
            rate_outcome(measured, 100.0, notes),
        ));
    }
    results.extend(direct_budget(data).await?);
    Ok(results)
}

/// A budget-accuracy figure: the measured rate against the configured one, within 5 %.
fn rate_outcome(measured: f64, budget: f64, notes: Map<String, Value>) -> Outcome {
    let ratio = measured / budget;
    outcome(
        measured,
        budget,
        ratio,
        "MiB/s",
        "0.95..1.05",
        (0.95..=1.05).contains(&ratio),
        notes,
    )
}

/// A second 128 MiB volume for two direct backups at once (one file read by both would be
/// read from the disk once).
fn second_budget_volume(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("agent-budget-b");
    if root.join(".complete").exists() {
        return Ok(root.join("data"));
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("data"))?;
    random_file(&root.join("data/one"), 16, 0x1234_5678_9abc_def1)?;
    std::fs::write(root.join(".complete"), b"")?;
    Ok(root.join("data"))
}

/// A direct backup of an uncached volume under a node budget; restic's read rate from the
/// disk, as the kernel counted it.
async fn direct_budgeted(
    scratch: &Path,
    repo: &str,
    volume: &Path,
    budget: AssignmentBudget,
) -> anyhow::Result<(f64, u64)> {
    let restic = fresh_repo(scratch, repo)?.with_program(restic_bin());
    restic.init().await?;
    let r = engine::backup(&restic, request(volume, ReadMode::Direct, budget)).await?;
    ensure!(
        r.mode == Some(ReadMode::Direct),
        "read in {:?}: {:?}",
        r.mode,
        r.mode_note
    );
    Ok((
        r.storage_read_rate
            .context("restic's reads were not counted")?,
        r.storage_read_bytes.unwrap_or(0),
    ))
}

/// Budget accuracy in direct mode, where the kernel limits restic's reads from the volume's
/// disk: one backup at 50 MiB/s, and two at once sharing 100 MiB/s.
pub async fn direct_budget(data: &Path) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let a = dataset(data)?.join("budget");
    let b = second_budget_volume(data)?;
    let scratch = scratch(data)?;
    let mut results = Vec::new();
    let node = |mib: u64| {
        IoBudget::new(Limits {
            bytes_per_second: Some(mib * MIB),
            iops: None,
        })
    };
    evict(&a)?;
    let (rate, bytes) = direct_budgeted(
        &scratch,
        "direct-budget",
        &a,
        node(50).for_assignment(Limits::default()),
    )
    .await?;
    let measured = rate / MIB as f64;
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "restic's read rate from the disk in a direct backup (kernel's count, first read to \
         last) / 50 MiB/s budget"
            .into(),
    );
    notes.insert("storage_read_bytes".into(), bytes.into());
    results.push((
        "agent-direct-budget-accuracy-50mib",
        rate_outcome(measured, 50.0, notes),
    ));
    evict(&a)?;
    evict(&b)?;
    let shared = node(100);
    let (ra, rb) = tokio::join!(
        direct_budgeted(
            &scratch,
            "direct-budget-a",
            &a,
            shared.for_assignment(Limits::default())
        ),
        direct_budgeted(
            &scratch,
            "direct-budget-b",
            &b,
            shared.for_assignment(Limits::default())
        )
    );
    let measured = (ra?.0 + rb?.0) / MIB as f64;
    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "sum of two concurrent direct backups' read rates / node budget of 100 MiB/s".into(),
    );
    results.push((
        "agent-direct-budget-accuracy-shared",
        rate_outcome(measured, 100.0, notes),
    ));
    for name in ["direct-budget", "direct-budget-a", "direct-budget-b"] {
        let _ = std::fs::remove_dir_all(scratch.join(name));
    }
    Ok(results)
}

pub(crate) fn walk_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let m = entry.metadata()?;
        if m.is_dir() {
            total += walk_size(&entry.path())?;
        } else if m.is_file() {
            total += m.len();
        }
    }
    Ok(total)
}

pub(crate) fn files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

pub(crate) fn evict(dir: &Path) -> anyhow::Result<()> {
    let mut all = Vec::new();
    files(dir, &mut all)?;
    for f in all {
        let file = std::fs::File::open(&f)?;
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    }
    Ok(())
}

/// Bytes of the directory's files in the page cache, as `fincore` reports them.
pub(crate) fn cached_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut all = Vec::new();
    files(dir, &mut all)?;
    let mut total = 0;
    for chunk in all.chunks(2000) {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .args(chunk)
            .output()?;
        ensure!(
            out.status.success(),
            "fincore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        total += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

fn agent_peak_rss(volume: &Path, scratch: &Path) -> anyhow::Result<u64> {
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/stash-node-agent");
    ensure!(
        agent.exists(),
        "build the agent first: cargo build --release -p stash-node-agent"
    );
    let repo = scratch.join("rss");
    let _ = std::fs::remove_dir_all(&repo);
    let mut child = std::process::Command::new(agent)
        .args(["backup", "--mode", "stream", "--path"])
        .arg(volume)
        .arg("--repo")
        .arg(&repo)
        .env("RESTIC_PASSWORD", PASSWORD)
        .env("STASH_RESTIC", restic_bin())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak = peak.max(kb * 1024);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(child.wait()?.success(), "the agent's backup failed");
    Ok(peak)
}
