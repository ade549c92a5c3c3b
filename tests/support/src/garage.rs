//! A single-node Garage S3 server with one bucket and one key, on free ports, stopped on
//! drop. The S3 API listens on the address the caller names (loopback for host-only tests,
//! a cluster's gateway address for pods to reach); RPC and admin stay on loopback.

use anyhow::{Context, Result, bail};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

use crate::{free_port, pseudo_random, tool};

#[derive(Debug)]
pub struct Garage {
    dir: TempDir,
    child: Child,
    /// `http://<ip>:<port>` of the S3 API.
    pub endpoint: String,
    pub bucket: String,
    /// The region Garage answers with (restic and the AWS SDKs want one).
    pub region: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// Starts the server with its S3 API on `s3_ip` and waits until the bucket and key exist.
    pub fn start(s3_ip: IpAddr) -> Result<Garage> {
        let dir = tempfile::tempdir().context("failed to create Garage's directory")?;
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (rpc, s3, admin) = (free_port(lo)?, free_port(s3_ip)?, free_port(lo)?);
        let config = dir.path().join("garage.toml");
        let secret_hex: String = pseudo_random(32, u64::from(rpc))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret_hex}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3_ip}:{s3}\"\n\
                 root_domain = \".s3.garage\"\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .context("failed to write Garage's configuration")?;
        let garage = tool("garage")?;
        let log = std::fs::File::create(dir.path().join("server.log"))
            .context("failed to create Garage's log")?;
        let child = Command::new(&garage)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start garage")?;
        let server = Garage {
            dir,
            child,
            endpoint: format!("http://{s3_ip}:{s3}"),
            bucket: "stash".into(),
            region: "garage".into(),
            key_id: "GK0123456789abcdef01234567".into(),
            secret: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
        };
        server.provision(&garage, &config)?;
        Ok(server)
    }

    /// Layout, key and bucket, through Garage's CLI over RPC.
    fn provision(&self, garage: &Path, config: &Path) -> Result<()> {
        let cli = |args: &[&str]| -> Result<String, String> {
            let out = Command::new(garage)
                .arg("-c")
                .arg(config)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        };
        // The RPC port takes a moment to come up.
        let deadline = Instant::now() + Duration::from_secs(30);
        let node = loop {
            match cli(&["node", "id", "-q"]) {
                Ok(id) => break id.split('@').next().unwrap_or_default().trim().to_owned(),
                Err(e) if Instant::now() > deadline => {
                    bail!("garage did not start: {e} (log: {})", self.log().display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let steps: [&[&str]; 5] = [
            &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
            &["layout", "apply", "--version", "1"],
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "test",
                &self.key_id,
                &self.secret,
            ],
            &["bucket", "create", &self.bucket],
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                &self.bucket,
                "--key",
                "test",
            ],
        ];
        for step in steps {
            cli(step).map_err(|e| anyhow::anyhow!("garage {step:?} failed: {e}"))?;
        }
        Ok(())
    }

    /// The server's log, for a test that fails.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server process, for checks that it is gone after drop.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
