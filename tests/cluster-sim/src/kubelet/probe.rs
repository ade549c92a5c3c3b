//! Probes as the kubelet runs them: HTTP GET (2xx/3xx succeeds), TCP connect, and exec in
//! the container's namespaces (exit 0 succeeds), each bounded by `timeoutSeconds`.

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn port_of(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// Runs one probe; `Err` carries the failure message kubectl would show in events.
pub async fn run(
    probe: &Probe,
    c: &Container,
    pod_ip: Ipv4Addr,
    ctr_pid: Option<u32>,
) -> Result<(), String> {
    let timeout =
        Duration::from_secs(u64::try_from(probe.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    let fut = async {
        if let Some(h) = &probe.http_get {
            let port = port_of(c, &h.port).ok_or("unknown port")?;
            let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| {
                    format!(
                        "Get \"http://{host}:{port}{}\": {e}",
                        h.path.as_deref().unwrap_or("/")
                    )
                })?;
            let mut req = format!(
                "GET {} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n",
                h.path.as_deref().unwrap_or("/")
            );
            for hh in h.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", hh.name, hh.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or("malformed HTTP response")?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(t) = &probe.tcp_socket {
            let port = port_of(c, &t.port).ok_or("unknown port")?;
            let host = t.host.clone().unwrap_or_else(|| pod_ip.to_string());
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if let Some(e) = &probe.exec {
            let pid = ctr_pid.ok_or("the container is not running")?.to_string();
            let status = tokio::process::Command::new("nsenter")
                .args(["-t", &pid, "-m", "-u", "-n", "-p", "-r", "-w", "--"])
                .args(e.command.iter().flatten())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| e.to_string())?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("command failed: {status}"))
            }
        } else {
            Err("probe type not simulated (grpc)".to_owned())
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}
