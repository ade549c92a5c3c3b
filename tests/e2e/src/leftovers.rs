//! What a simulated environment leaves on the host, checked after teardown: processes (as
//! `ps` lists them, from /proc), mounts (`/proc/self/mountinfo`), addresses and routes on
//! `lo` and the pods' veth links. Scoped to this environment, so tests running beside it
//! with clusters of their own do not count.

use anyhow::{Result, bail};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The marks of one environment, taken while it runs.
#[derive(Debug)]
pub struct Footprint {
    state_dir: PathBuf,
    /// The third octet every address of this cluster shares (100.64–127.<id>.x).
    net_id: Option<u8>,
    /// Every process started under this test process (the kubelets' pause, nsenter and
    /// container processes, Garage), as they were before teardown.
    /// By pid and start time, so a pid the kernel hands out again is not mistaken for one.
    processes: BTreeSet<(u32, u64)>,
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    ppid: u32,
    start: u64,
    zombie: bool,
    cmdline: String,
    root: Option<PathBuf>,
}

fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            let state = *fields.first()?;
            let ppid = fields.get(1)?.parse().ok()?;
            // Field 22 of stat (the 20th after the command): start time in clock ticks.
            let start = fields.get(19)?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            Some(Proc {
                pid,
                ppid,
                start,
                zombie: state == "Z" || state == "X",
                cmdline,
                root: std::fs::read_link(format!("/proc/{pid}/root")).ok(),
            })
        })
        .collect()
}

/// The descendants of `root` (not itself).
fn descendants(all: &[Proc], root: u32) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in all.iter().filter(|c| c.ppid == p) {
            if found.insert(c.pid) {
                frontier.push(c.pid);
            }
        }
    }
    found
}

fn ip(args: &[&str]) -> String {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether `a.b.c.d` is one of this cluster's addresses (gateway, node or pod).
fn is_cluster_addr(word: &str, id: u8) -> bool {
    let addr = word.split('/').next().unwrap_or(word);
    let Ok(std::net::IpAddr::V4(v4)) = addr.parse::<IpAddr>() else {
        return false;
    };
    let o = v4.octets();
    o[0] == 100 && (64..128).contains(&o[1]) && o[2] == id
}

impl Footprint {
    pub fn take(
        state_dir: &Path,
        gateway: IpAddr,
        garage: Option<&stash_test_support::Garage>,
    ) -> Self {
        let all = processes();
        let mut ours = descendants(&all, std::process::id());
        ours.extend(garage.map(|g| g.pid()));
        let processes = all
            .iter()
            .filter(|p| ours.contains(&p.pid))
            .map(|p| (p.pid, p.start))
            .collect();
        let net_id = match gateway {
            IpAddr::V4(v4) => Some(v4.octets()[2]),
            IpAddr::V6(_) => None,
        };
        Self {
            state_dir: state_dir.to_owned(),
            net_id,
            processes,
        }
    }

    /// What is still there, one line each.
    fn remaining(&self) -> Vec<String> {
        let mut left = Vec::new();
        for p in processes() {
            if p.zombie {
                // Exited; only its exit status waits to be read. Nothing runs.
                continue;
            }
            let chrooted = p
                .root
                .as_ref()
                .is_some_and(|r| r.starts_with(&self.state_dir));
            if self.processes.contains(&(p.pid, p.start)) || chrooted {
                left.push(format!("process {} ({})", p.pid, p.cmdline.trim()));
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = self.state_dir.to_string_lossy();
        for line in mountinfo.lines() {
            if line
                .split(' ')
                .nth(4)
                .is_some_and(|m| m.starts_with(dir.as_ref()))
            {
                left.push(format!("mount {line}"));
            }
        }
        if let Some(id) = self.net_id {
            for line in ip(&["-o", "addr", "show", "dev", "lo"]).lines() {
                if line.split_whitespace().any(|w| is_cluster_addr(w, id)) {
                    left.push(format!("address {}", line.trim()));
                }
            }
            for line in ip(&["route", "show"]).lines() {
                if line
                    .split_whitespace()
                    .next()
                    .is_some_and(|w| is_cluster_addr(w, id))
                {
                    left.push(format!("route {}", line.trim()));
                }
            }
            let prefix = format!("cs{id}n");
            for line in ip(&["-o", "link", "show"]).lines() {
                if line
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|n| n.starts_with(&prefix))
                {
                    left.push(format!("link {}", line.trim()));
                }
            }
        }
        left
    }

    /// Fails naming whatever is left once teardown has had a moment (killed processes
    /// take a little while to exit and their sandboxes' links to go).
    pub async fn check_gone(&self) -> Result<()> {
        let mut left = Vec::new();
        for _ in 0..100 {
            left = self.remaining();
            if left.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("teardown left behind:\n  {}", left.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_addresses_are_recognised_by_their_id() {
        assert!(is_cluster_addr("100.64.7.1/32", 7));
        assert!(is_cluster_addr("100.66.7.12", 7));
        assert!(!is_cluster_addr("100.64.8.1/32", 7));
        assert!(!is_cluster_addr("127.0.0.1/8", 7));
        assert!(!is_cluster_addr("lo", 7));
    }

    #[tokio::test]
    async fn a_child_still_running_is_reported_until_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let f = Footprint::take(dir.path(), "100.64.250.1".parse().unwrap(), None);
        let left = f.remaining();
        assert!(
            left.iter()
                .any(|l| l.starts_with(&format!("process {} ", child.id()))),
            "{left:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        f.check_gone().await.unwrap();
    }

    #[test]
    fn descendants_follow_parent_links() {
        let p = |pid, ppid| Proc {
            pid,
            ppid,
            start: 0,
            zombie: false,
            cmdline: String::new(),
            root: None,
        };
        let all = [p(2, 1), p(3, 2), p(4, 3), p(5, 1)];
        assert_eq!(descendants(&all, 2), BTreeSet::from([3, 4]));
    }
}
