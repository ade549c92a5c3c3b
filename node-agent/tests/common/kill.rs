//! Killing an agent at a chosen point of its backup, as the kernel would: SIGKILL, no
//! chance to clean up. The point is how much its restic has read (its `/proc/<pid>/io`),
//! so it moves with the test's choice, not with the machine's speed.
// Shared by several test files; each uses what it needs.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use restic_wrapper::{Backend, Repository, Restic, Secrets};
use serde_json::Value;
use sha2::{Digest, Sha256};
use stash_node_agent::engine::{self, RestoreRequest};

type Result<T = ()> = anyhow::Result<T>;

/// Rounds per mode: the agent dies after 1/8, 2/8, … 8/8 of the volume was read.
pub const ROUNDS: u64 = 8;
pub const VOLUME_BYTES: usize = 16 << 20;

/// A deadline so a broken agent fails the test instead of hanging it; never a performance
/// threshold.
pub const HANG: Duration = Duration::from_secs(300);

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            stat_fields(*p).is_some_and(|f| f.get(1).map(String::as_str) == Some(&pid.to_string()))
        })
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The agent's restic running `command` (`backup`, …), once it is restic (not yet the
/// agent's exec shim).
pub fn restic_child(agent: u32, command: &str) -> Option<u32> {
    children(agent).into_iter().find(|p| {
        let args = cmdline(*p);
        args.first().is_some_and(|a| a.ends_with("restic")) && args.iter().any(|a| a == command)
    })
}

/// Bytes the process has read (`rchar`: files, pipes and sockets alike).
pub fn bytes_read(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Gone, or a zombie no one has reaped yet.
pub fn gone(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|f| f.first().map(String::as_str) == Some("Z"))
}

fn signal(pid: u32, signal: &str) -> bool {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether SIGTERM waits for the process (it is stopped and cannot act on it yet).
fn sigterm_pending(pid: u32) -> Result<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let pending = status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("ShdPnd:")
                .or_else(|| l.strip_prefix("SigPnd:"))
        })
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .fold(0, |a, b| a | b);
    Ok(pending & (1 << (15 - 1)) != 0)
}

/// How a killed backup went.
#[derive(Debug)]
pub enum Death {
    /// The agent was killed once its restic had read this much; the kernel then sent the
    /// restic SIGTERM (`told`), and it is gone.
    Killed { read: u64, told: bool },
    /// The backup finished before its restic read that much.
    Finished,
}

/// Kills `agent` (SIGKILL) once the restic of its backup has read `threshold` bytes. restic
/// is stopped first, so the agent dies at that very point and what the kernel does to
/// restic can be seen: then restic goes on, and must end.
pub fn kill_after_read(agent: &mut Child, threshold: u64) -> Result<Death> {
    let started = Instant::now();
    loop {
        anyhow::ensure!(
            started.elapsed() < HANG,
            "the backup never read {threshold} bytes"
        );
        if agent.try_wait()?.is_some() {
            return Ok(Death::Finished);
        }
        let Some(restic) = restic_child(agent.id(), "backup") else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let read = bytes_read(restic).unwrap_or(0);
        if read < threshold || !signal(restic, "-STOP") {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // A stop takes effect asynchronously: a signal arriving before it would be handled.
        while stat_fields(restic).is_some_and(|f| f.first().map(String::as_str) != Some("T")) {
            anyhow::ensure!(started.elapsed() < HANG, "restic {restic} does not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
        // It ended before the stop took hold: the backup is finishing; look again.
        if gone(restic) {
            continue;
        }
        agent.kill()?;
        agent.wait()?;
        // The agent has been reaped, so the kernel has done all it does at its death.
        let told = sigterm_pending(restic)?;
        signal(restic, "-CONT");
        while !gone(restic) {
            anyhow::ensure!(
                started.elapsed() < HANG,
                "restic {restic} outlived its agent"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        return Ok(Death::Killed { read, told });
    }
}

/// Fills `volume` with what round `round` has: four files of pseudo-random bytes (all new
/// each round, so every backup must read all of them) and a file naming the round.
pub fn fill(volume: &Path, round: u64, bytes: usize) -> Result {
    std::fs::create_dir_all(volume.join("sub"))?;
    for (i, name) in ["a.bin", "b.bin", "sub/c.bin", "sub/d.bin"]
        .iter()
        .enumerate()
    {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ (round << 8) ^ i as u64;
        let data: Vec<u8> = (0..bytes / 4)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(volume.join(name), data)?;
    }
    std::fs::write(volume.join("round"), round.to_string())?;
    Ok(())
}

/// Every regular file below `root` by relative path, with a digest of its content.
pub fn contents(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let kind = std::fs::symlink_metadata(&path)?.file_type();
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel, Sha256::digest(std::fs::read(&path)?).to_vec());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// The round a restored volume says it is from.
pub fn round_of(root: &Path) -> Option<u64> {
    std::fs::read_to_string(root.join("round"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What the repository must hold: each round's volume, and the snapshots already restored
/// and compared with it.
#[derive(Debug)]
pub struct Ledger {
    pub restic: Restic,
    pub repo: PathBuf,
    stock: PathBuf,
    password: String,
    scratch: PathBuf,
    rounds: BTreeMap<u64, BTreeMap<String, Vec<u8>>>,
    verified: HashSet<String>,
}

impl Ledger {
    pub fn new(repo: &Path, scratch: &Path, restic: &Path, password: &str) -> Result<Ledger> {
        let repository = Repository::new(
            Backend::Local {
                path: repo.to_path_buf(),
            },
            Secrets::new().with("RESTIC_PASSWORD", password),
            scratch,
        )?;
        Ok(Ledger {
            restic: Restic::new(repository).with_program(restic),
            repo: repo.to_path_buf(),
            stock: restic.to_path_buf(),
            password: password.to_owned(),
            scratch: scratch.to_path_buf(),
            rounds: BTreeMap::new(),
            verified: HashSet::new(),
        })
    }

    /// Writes round `round`'s volume and remembers it.
    pub fn fill(&mut self, volume: &Path, round: u64) -> Result {
        fill(volume, round, VOLUME_BYTES)?;
        self.rounds.insert(round, contents(volume)?);
        Ok(())
    }

    /// Restores `id` and checks it holds the whole volume of a round; returns the round.
    pub async fn restores_whole(&mut self, id: &str) -> Result<u64> {
        let target = self
            .scratch
            .join(format!("restore-{}", &id[..12.min(id.len())]));
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target)?;
        let req = RestoreRequest {
            snapshot: id.to_owned(),
            target: target.clone(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: false,
        };
        engine::restore(&self.restic, req)
            .await
            .map_err(|e| anyhow::anyhow!("snapshot {id} does not restore: {e}"))?;
        let round = round_of(&target)
            .ok_or_else(|| anyhow::anyhow!("snapshot {id} restores without its round file"))?;
        let expected = self.rounds.get(&round);
        anyhow::ensure!(
            expected == Some(&contents(&target)?),
            "snapshot {id} restores to less than round {round}'s volume"
        );
        std::fs::remove_dir_all(&target)?;
        self.verified.insert(id.to_owned());
        Ok(round)
    }

    /// Every snapshot in the repository, as stock restic lists them, restores whole, and
    /// `restic check` is clean.
    pub async fn all_whole(&mut self) -> Result {
        let listed = self.stock(&["snapshots", "--json"])?;
        let snapshots: Vec<Value> = serde_json::from_slice(&listed)?;
        for s in snapshots {
            let id = s["id"].as_str().unwrap_or_default().to_owned();
            if !self.verified.contains(&id) {
                self.restores_whole(&id).await?;
            }
        }
        self.stock(&["check"])?;
        Ok(())
    }

    pub fn stock(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = std::process::Command::new(&self.stock)
            .args(args)
            .args(["--no-cache", "--quiet"])
            .env("RESTIC_REPOSITORY", &self.repo)
            .env("RESTIC_PASSWORD", &self.password)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "restic {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    }
}
