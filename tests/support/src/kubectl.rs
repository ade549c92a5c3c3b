//! kubectl pointed at one kubeconfig, as a user types it, and polling that gives up only
//! to guard against a hang (never as a timing assertion).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Kubectl {
    bin: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    /// kubectl from `.tools/bin` (else PATH) with `KUBECONFIG=<kubeconfig>`.
    pub fn new(kubeconfig: &Path) -> Self {
        Self {
            bin: crate::tool("kubectl").unwrap_or_else(|_| PathBuf::from("kubectl")),
            kubeconfig: kubeconfig.to_owned(),
        }
    }

    /// Runs kubectl; fails with its stderr when it exits non-zero.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, None).await
    }

    pub async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args).env("KUBECONFIG", &self.kubeconfig);
        let what = format!("kubectl {}", args.join(" "));
        let out = crate::run(cmd, stdin.map(str::as_bytes), &what).await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of a YAML stream.
    pub async fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await
    }

    /// `kubectl create -f -` (for objects a user creates rather than applies: sessions).
    pub async fn create(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["create", "-f", "-"], Some(yaml)).await
    }

    /// `kubectl <args> -o json`, parsed.
    pub async fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a).await?;
        serde_json::from_str(&out)
            .with_context(|| format!("kubectl {} printed no JSON", a.join(" ")))
    }

    /// `kubectl get <args>`: the object, or `None` when it does not exist.
    pub async fn get(&self, args: &[&str]) -> Result<Option<serde_json::Value>> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.push("--ignore-not-found");
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a).await?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&out)?))
    }

    /// `kubectl wait --for=<condition> <resource> --timeout=<timeout>`: `condition=Ready`,
    /// `jsonpath={.status.phase}=Succeeded`, `delete`.
    pub async fn wait_for(
        &self,
        resource: &str,
        ns: &str,
        condition: &str,
        timeout: Duration,
    ) -> Result<String> {
        let for_ = format!("--for={condition}");
        let t = format!("--timeout={}s", timeout.as_secs());
        self.kubectl(&["wait", resource, "-n", ns, &for_, &t]).await
    }
}

/// Polls `check` every 200 ms until it returns `Some`; `timeout` only guards against a hang.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {}s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
