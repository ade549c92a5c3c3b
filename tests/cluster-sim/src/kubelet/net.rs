//! Pod networking: each pod sandbox is a network namespace held open by a pause process,
//! joined to the host by a veth pair and a /32 route, with its address from the cluster's
//! range in 100.64.0.0/10 (shared address space, never routed off this machine). The
//! cluster's gateway address on the host's loopback is where pods reach the API server.

use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::process::{Child, Command};

/// The host addresses a cluster added to `lo`, removed again on drop.
#[derive(Debug)]
pub struct ClusterNet {
    pub id: u8,
    added: Mutex<Vec<Ipv4Addr>>,
}

fn run_ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new("ip").args(args).output()
}

fn ip_ok(args: &[&str], action: &'static str) -> Result<()> {
    let out = run_ip(args).map_err(Error::io(action, "ip"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Invalid {
            action,
            message: format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

impl ClusterNet {
    /// Claims a free cluster id: the first whose gateway address is not on `lo` yet.
    pub fn claim() -> Result<Self> {
        let start = u8::try_from(std::process::id() % 250).unwrap_or(0);
        for i in 0..250u8 {
            let id = start.wrapping_add(i) % 250;
            let gw = Self::gateway_of(id);
            let out = run_ip(&["addr", "add", &format!("{gw}/32"), "dev", "lo"])
                .map_err(Error::io("add an address", "lo"))?;
            if out.status.success() {
                return Ok(Self {
                    id,
                    added: Mutex::new(vec![gw]),
                });
            }
        }
        Err(Error::Invalid {
            action: "claim a pod network",
            message: "every cluster id is in use".into(),
        })
    }

    fn gateway_of(id: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, id, 1)
    }

    /// Where pods reach the host (and the API server listens).
    pub fn gateway(&self) -> Ipv4Addr {
        Self::gateway_of(self.id)
    }

    /// The node's own address (its InternalIP, the pods' hostIP).
    pub fn node_ip(&self, node: u8) -> Result<Ipv4Addr> {
        let ip = Ipv4Addr::new(100, 65 + node, self.id, 1);
        ip_ok(
            &["addr", "add", &format!("{ip}/32"), "dev", "lo"],
            "add the node address",
        )?;
        self.added
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(ip);
        Ok(ip)
    }

    pub fn pod_ip(&self, node: u8, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 65 + node, self.id, n)
    }
}

impl Drop for ClusterNet {
    fn drop(&mut self) {
        for ip in self
            .added
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = run_ip(&["addr", "del", &format!("{ip}/32"), "dev", "lo"]);
        }
    }
}

/// A pod's network namespace, alive while its pause process is.
#[derive(Debug)]
pub struct Sandbox {
    pause: Child,
    pub pid: u32,
    pub ip: Ipv4Addr,
    host_if: String,
}

fn netns_inode(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

impl Sandbox {
    pub async fn create(gw: Ipv4Addr, ip: Ipv4Addr, host_if: String) -> Result<Self> {
        let mut pause = Command::new("unshare")
            .args(["--net", "--", "sleep", "infinity"])
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(Error::io("start the pause process", "unshare"))?;
        let pid = pause.id().ok_or_else(|| Error::Invalid {
            action: "start the pause process",
            message: "it exited at once".into(),
        })?;
        // The namespace exists once the pause process is no longer in ours.
        let ours = netns_inode("self");
        loop {
            if let Some(status) = pause.try_wait().map_err(Error::io("wait for", "unshare"))? {
                return Err(Error::Invalid {
                    action: "start the pause process",
                    message: format!("it exited: {status}"),
                });
            }
            let theirs = netns_inode(&pid.to_string());
            if theirs.is_some() && theirs != ours {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let sb = Self {
            pause,
            pid,
            ip,
            host_if,
        };
        sb.wire(gw)?;
        Ok(sb)
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    fn wire(&self, gw: Ipv4Addr) -> Result<()> {
        let pid = self.pid.to_string();
        let peer = format!("{}p", self.host_if);
        ip_ok(
            &[
                "link",
                "add",
                &self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &pid,
            ],
            "create the pod's veth pair",
        )?;
        ip_ok(
            &["link", "set", &self.host_if, "up"],
            "bring up the host end",
        )?;
        ip_ok(
            &[
                "route",
                "add",
                &format!("{}/32", self.ip),
                "dev",
                &self.host_if,
                "src",
                &gw.to_string(),
            ],
            "route to the pod",
        )?;
        let ns = format!("--net=/proc/{pid}/ns/net");
        let inside: &[&[&str]] = &[
            &["link", "set", "lo", "up"],
            &["link", "set", &peer, "name", "eth0"],
            &["addr", "add", &format!("{}/32", self.ip), "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", &format!("{gw}/32"), "dev", "eth0"],
            &[
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ],
        ];
        for args in inside {
            let out = std::process::Command::new("nsenter")
                .arg(&ns)
                .arg("ip")
                .args(*args)
                .output()
                .map_err(Error::io("configure the pod network", "nsenter"))?;
            if !out.status.success() {
                return Err(Error::Invalid {
                    action: "configure the pod network",
                    message: format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.pause.start_kill();
        // The veth pair goes with the namespace; deleting the host end makes it immediate.
        let _ = run_ip(&["link", "del", &self.host_if]);
    }
}
