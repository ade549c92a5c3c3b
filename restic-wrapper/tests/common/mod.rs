//! Test support: the real restic and Garage binaries from `make setup`, temporary
//! repositories, and a Garage S3 server on free loopback ports, stopped on drop.
// Test support panics on failure, as tests do.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use restic_wrapper::{Backend, Repository, Restic, Secrets};
use tempfile::TempDir;

pub const PASSWORD: &str = "correct horse battery staple";

/// A tool from `.tools/bin` (what `make setup` installs), else from PATH.
pub fn tool(name: &str) -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/bin")
        .join(name);
    if local.exists() {
        return local;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    on_path.unwrap_or_else(|| panic!("{name} is not installed: run `make setup`"))
}

pub fn restic_bin() -> PathBuf {
    tool("restic")
}

/// A client for a local repository inside `dir` (not yet initialized).
pub fn local(dir: &Path, password: &str) -> Restic {
    let repo = Repository::new(
        Backend::Local {
            path: dir.join("repo"),
        },
        Secrets::new().with("RESTIC_PASSWORD", password),
        dir,
    )
    .expect("repository");
    Restic::new(repo)
        .with_program(restic_bin())
        .with_tmp_dir(dir)
        .with_grace(Duration::from_secs(10))
}

/// A directory with a few files, a subdirectory and a symlink.
pub fn sample_tree(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(data.join("sub/b.bin"), pseudo_random(300_000, 7)).unwrap();
    std::fs::write(data.join("skip.tmp"), b"excluded").unwrap();
    std::os::unix::fs::symlink("a.txt", data.join("link")).unwrap();
    data
}

/// Incompressible bytes without a random-number dependency.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-node Garage S3 server with one bucket and one key.
pub struct Garage {
    _dir: TempDir,
    child: Child,
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let secret_hex: String = pseudo_random(32, rpc as u64)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret_hex}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage\"\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let garage = tool("garage");
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(&garage)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        let mut server = Garage {
            _dir: dir,
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "stash".into(),
            key_id: "GK0123456789abcdef01234567".into(),
            secret: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
        };
        let cli = |args: &[&str]| -> Result<String, String> {
            let out = Command::new(&garage)
                .arg("-c")
                .arg(&config)
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
                Err(e) if Instant::now() > deadline => panic!("garage did not start: {e}"),
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
                &server.key_id,
                &server.secret,
            ],
            &["bucket", "create", "stash"],
            &[
                "bucket", "allow", "--read", "--write", "--owner", "stash", "--key", "test",
            ],
        ];
        for step in steps {
            cli(step).unwrap_or_else(|e| panic!("garage {step:?}: {e}"));
        }
        server.bucket = "stash".into();
        server
    }

    pub fn backend(&self, prefix: &str) -> Backend {
        Backend::S3 {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            region: Some("garage".into()),
            insecure_tls: false,
        }
    }

    pub fn secrets(&self) -> Secrets {
        Secrets::new()
            .with("RESTIC_PASSWORD", PASSWORD)
            .with("AWS_ACCESS_KEY_ID", self.key_id.clone())
            .with("AWS_SECRET_ACCESS_KEY", self.secret.clone())
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records every restic process a client starts and how each ended.
#[derive(Debug, Default)]
pub struct Spawns(std::sync::Mutex<Vec<(restic_wrapper::SpawnedProcess, Option<ExitStatus>)>>);

impl Spawns {
    /// The pids of the processes started for an action, in order.
    pub fn pids(&self, action: &str) -> Vec<u32> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.action == action)
            .map(|(p, _)| p.pid)
            .collect()
    }

    /// How a process ended, once it was reaped.
    pub fn exit(&self, pid: u32) -> Option<ExitStatus> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| p.pid == pid)
            .and_then(|(_, s)| *s)
    }

    pub fn all(&self) -> Vec<(restic_wrapper::SpawnedProcess, Option<ExitStatus>)> {
        self.0.lock().unwrap().clone()
    }
}

impl restic_wrapper::SpawnObserver for Spawns {
    fn started(&self, process: &restic_wrapper::SpawnedProcess) {
        self.0.lock().unwrap().push((process.clone(), None));
    }

    fn exited(&self, process: &restic_wrapper::SpawnedProcess, status: ExitStatus) {
        let mut all = self.0.lock().unwrap();
        if let Some(entry) = all.iter_mut().find(|(p, s)| p == process && s.is_none()) {
            entry.1 = Some(status);
        }
    }
}

/// A reader that never ends, so a stdin backup holds its lock until it is stopped.
pub struct Endless;

impl tokio::io::AsyncRead for Endless {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// This machine's host name, as restic writes it into its locks.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}
