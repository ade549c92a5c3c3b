//! Pod networking: each pod sandbox is a network namespace held open by a pause process,
//! with its address from the cluster's range in 100.64.0.0/10 (shared address space, never
//! routed off this machine). Pods hang by veth pairs off the cluster's router, a network
//! namespace of its own that forwards between them and the host, so pods reach each other
//! and the host reaches every pod without the host forwarding anything. The cluster's gateway
//! address on the host's loopback is where pods reach the API server.

use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::process::{Child, Command};

/// The host addresses a cluster added to `lo` and its router, removed again on drop.
#[derive(Debug)]
pub struct ClusterNet {
    pub id: u8,
    added: Mutex<Vec<Ipv4Addr>>,
    router: Mutex<Option<std::process::Child>>,
    router_pid: u32,
}

/// The router's end of the link to the host.
const ROUTER_UPLINK: &str = "uplink";

/// Runs `ip` (or, with `sh`, a shell line) inside the network namespace of `pid`.
fn in_netns(pid: u32, args: &[&str], action: &'static str) -> Result<()> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(if args.first() == Some(&"sh") {
            &[][..]
        } else {
            &["ip"][..]
        })
        .args(args)
        .output()
        .map_err(Error::io(action, "nsenter"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Invalid {
            action,
            message: format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Starts a pause process in a new network namespace and returns once the namespace exists.
fn pause_process() -> Result<std::process::Child> {
    let mut pause = std::process::Command::new("unshare")
        .args(["--net", "--", "sleep", "infinity"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(Error::io("start the pause process", "unshare"))?;
    let ours = netns_inode("self");
    loop {
        if let Some(status) = pause.try_wait().map_err(Error::io("wait for", "unshare"))? {
            return Err(Error::Invalid {
                action: "start the pause process",
                message: format!("it exited: {status}"),
            });
        }
        let theirs = netns_inode(&pause.id().to_string());
        if theirs.is_some() && theirs != ours {
            return Ok(pause);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
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
                let mut router = pause_process()?;
                let router_pid = router.id();
                let net = Self {
                    id,
                    added: Mutex::new(vec![gw]),
                    router: Mutex::new(None),
                    router_pid,
                };
                if let Err(e) = net.wire_router() {
                    let _ = router.kill();
                    let _ = router.wait();
                    drop(net);
                    return Err(e);
                }
                *net.router
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(router);
                return Ok(net);
            }
        }
        Err(Error::Invalid {
            action: "claim a pod network",
            message: "every cluster id is in use".into(),
        })
    }

    /// Runs `f` on a thread of its own inside the router's network namespace: sockets it
    /// makes there stay there.
    pub fn in_router<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let path = format!("/proc/{}/ns/net", self.router_pid);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(path)?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the router thread panicked")))
    }

    /// Adds (or with `add: false` removes) an address on the router's loopback.
    pub fn router_address(&self, ip: Ipv4Addr, add: bool) -> Result<()> {
        let cidr = format!("{ip}/32");
        let verb = if add { "add" } else { "del" };
        in_netns(
            self.router_pid,
            &["addr", verb, &cidr, "dev", "lo"],
            "change a router address",
        )
    }

    /// The host's end of the link to the router.
    fn uplink(&self) -> String {
        format!("cs{}r", self.id)
    }

    /// The router forwards (in its own namespace only) between the pods' links and its
    /// uplink to the host, and answers ARP for what lies behind it (proxy ARP), so neither
    /// side needs an address on the link: the host routes each pod's /32 into the uplink,
    /// the router sends everything else to the gateway.
    fn wire_router(&self) -> Result<()> {
        let pid = self.router_pid.to_string();
        let gw = self.gateway().to_string();
        ip_ok(
            &[
                "link",
                "add",
                &self.uplink(),
                "type",
                "veth",
                "peer",
                "name",
                ROUTER_UPLINK,
                "netns",
                &pid,
            ],
            "create the router's uplink",
        )?;
        ip_ok(
            &["link", "set", &self.uplink(), "up"],
            "bring up the uplink",
        )?;
        let forward = format!(
            "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv4/conf/{ROUTER_UPLINK}/proxy_arp"
        );
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", ROUTER_UPLINK, "up"],
            &["route", "add", &format!("{gw}/32"), "dev", ROUTER_UPLINK],
            &["route", "add", "default", "via", &gw, "dev", ROUTER_UPLINK],
            &["sh", "-c", &forward],
        ] {
            in_netns(self.router_pid, args, "configure the cluster's router")?;
        }
        Ok(())
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
        if let Some(mut r) = self
            .router
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = r.kill();
            let _ = r.wait();
        }
        // The uplink goes with the router's namespace; deleting it makes that immediate.
        let _ = run_ip(&["link", "del", &self.uplink()]);
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
    uplink: String,
}

fn netns_inode(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

impl Sandbox {
    pub async fn create(net: &ClusterNet, ip: Ipv4Addr, host_if: String) -> Result<Self> {
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
            uplink: net.uplink(),
        };
        sb.wire(net)?;
        Ok(sb)
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// A veth pair from the router to the pod, a /32 route to the pod on the router and on
    /// the host (through the uplink), and in the pod `eth0` with a default route to the
    /// gateway, which the router's proxy ARP stands in for.
    fn wire(&self, net: &ClusterNet) -> Result<()> {
        let pid = self.pid.to_string();
        let router = net.router_pid;
        let gw = net.gateway();
        let peer = format!("{}p", self.host_if);
        ip_ok(
            &[
                "link",
                "add",
                &self.host_if,
                "netns",
                &router.to_string(),
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
        let proxy_arp = format!(
            "echo 1 > /proc/sys/net/ipv4/conf/{}/proxy_arp",
            self.host_if
        );
        for args in [
            &["link", "set", &self.host_if, "up"][..],
            &["sh", "-c", &proxy_arp],
            &[
                "route",
                "add",
                &format!("{}/32", self.ip),
                "dev",
                &self.host_if,
            ],
        ] {
            in_netns(router, args, "connect the pod to the router")?;
        }
        ip_ok(
            &[
                "route",
                "add",
                &format!("{}/32", self.ip),
                "dev",
                &self.uplink,
                "src",
                &gw.to_string(),
            ],
            "route to the pod",
        )?;
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
            in_netns(self.pid, args, "configure the pod network")?;
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.pause.start_kill();
        // The veth pair goes with the pod's namespace; the host's route to the pod does not.
        let _ = run_ip(&[
            "route",
            "del",
            &format!("{}/32", self.ip),
            "dev",
            &self.uplink,
        ]);
    }
}
