//! The container runtime: a container of a known image runs as a real process in the pod's
//! network namespace, with its own mount, UTS and PID namespaces, inside a root made of the
//! host's system directories, the image's files and the pod's volume mounts.

use crate::error::{Error, Result};
use rustix::mount::{
    MountFlags, MountPropagationFlags, mount, mount_bind, mount_bind_recursive, mount_change,
    mount_remount,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// An image this runtime can run: its entrypoint and default arguments, and the files it
/// carries (container path → host file).
#[derive(Debug, Clone, Default)]
pub struct Image {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub files: Vec<(String, PathBuf)>,
    pub env: Vec<(String, String)>,
}

impl Image {
    /// An image built like this project's (`ENTRYPOINT ["/usr/local/bin/<bin>"]`,
    /// `CMD ["run"]`) from a binary of this checkout, plus extra files (such as restic).
    pub fn binary(binary: PathBuf, name: &str, cmd: &[&str]) -> Self {
        let entry = format!("/usr/local/bin/{name}");
        Self {
            entrypoint: vec![entry.clone()],
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            files: vec![(entry, binary)],
            env: Vec::new(),
        }
    }
}

/// The images of a cluster, by repository (the reference without registry, tag or digest).
#[derive(Debug, Clone, Default)]
pub struct Images {
    pub known: BTreeMap<String, Image>,
    /// Foreign images whose container command runs on the host's tools (busybox-like use).
    pub host_commands: Vec<String>,
}

/// `ghcr.io/stash-rs/stash-node-agent:0.1.0` → `stash-node-agent`.
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

impl Images {
    /// The image to run for a reference, if it runs as a process at all.
    pub fn resolve(&self, image: &str) -> Option<Image> {
        let repo = repository(image);
        if let Some(i) = self.known.get(repo) {
            return Some(i.clone());
        }
        self.host_commands
            .iter()
            .any(|h| h == repo)
            .then(Image::default)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountSpec {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
    /// `None`, `HostToContainer` or `Bidirectional`.
    pub propagation: String,
}

/// What `cluster-sim container-init` builds before it becomes the container's process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    pub rootfs: PathBuf,
    pub hostname: String,
    pub etc_hosts: PathBuf,
    pub image_files: Vec<(String, PathBuf)>,
    pub mounts: Vec<MountSpec>,
    pub working_dir: Option<String>,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
}

fn errno(action: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> Error {
    let path = path.to_owned();
    move |e| Error::io(action, path)(e.into())
}

fn inside(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn mount_point(target: &Path, dir: bool) -> Result<()> {
    if dir {
        std::fs::create_dir_all(target).map_err(Error::io("create the mount point", target))
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("create the mount point", parent))?;
        }
        if !target.exists() {
            std::fs::write(target, b"").map_err(Error::io("create the mount point", target))?;
        }
        Ok(())
    }
}

fn bind_ro(src: &Path, dst: &Path, recursive: bool) -> Result<()> {
    mount_point(dst, src.is_dir())?;
    if recursive {
        mount_bind_recursive(src, dst).map_err(errno("bind-mount", dst))?;
    } else {
        mount_bind(src, dst).map_err(errno("bind-mount", dst))?;
    }
    mount_remount(dst, MountFlags::BIND | MountFlags::RDONLY, "")
        .map_err(errno("make read-only", dst))
}

/// Makes every mount beneath `dir` read-only as well: a recursive bind made read-only
/// leaves the mounts under it (the cgroup filesystems under /sys) writable, where runc mounts
/// /sys and the cgroup filesystem read-only in a container that is not privileged.
fn read_only_beneath(dir: &Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read", "/proc/self/mountinfo"))?;
    for point in info.lines().filter_map(|l| l.split(' ').nth(4)) {
        let point = Path::new(point);
        // Escaped names (`\040`) do not occur under /sys.
        if point != dir && point.starts_with(dir) {
            mount_remount(point, MountFlags::BIND | MountFlags::RDONLY, "")
                .map_err(errno("make read-only", point))?;
        }
    }
    Ok(())
}

/// Runs in the container's new namespaces: assembles the root, then execs the process.
/// Only returns on failure.
pub fn container_init(spec: &InitSpec) -> Result<std::convert::Infallible> {
    let root = &spec.rootfs;
    std::fs::create_dir_all(root).map_err(Error::io("create the root", root))?;
    // The host's system directories, read-only; merged-/usr symlinks kept as links.
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(top);
        let target = root.join(top);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&host).map_err(Error::io("read", host.clone()))?;
                if std::fs::symlink_metadata(&target).is_err() {
                    std::os::unix::fs::symlink(to, &target)
                        .map_err(Error::io("link", target.clone()))?;
                }
            }
            Ok(m) if m.is_dir() => bind_ro(&host, &target, true)?,
            _ => {}
        }
    }
    // /etc in the writable layer (files copied, directories bound read-only), so a
    // container can mount volumes under it as images with their own /etc allow.
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(Error::io("create", etc.clone()))?;
    for entry in std::fs::read_dir("/etc")
        .map_err(Error::io("read", "/etc"))?
        .flatten()
    {
        let target = etc.join(entry.file_name());
        let ft = entry.file_type().map_err(Error::io("stat", entry.path()))?;
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        if ft.is_symlink() {
            let to = std::fs::read_link(entry.path()).map_err(Error::io("read", entry.path()))?;
            std::os::unix::fs::symlink(to, &target).map_err(Error::io("link", target.clone()))?;
        } else if ft.is_dir() {
            bind_ro(&entry.path(), &target, true)?;
        } else if ft.is_file() {
            // Unreadable files (shadow for a non-root runtime) are left out.
            let _ = std::fs::copy(entry.path(), &target);
        }
    }
    let usr = root.join("usr");
    std::fs::create_dir_all(usr.join("local/bin")).map_err(Error::io("create", usr.clone()))?;
    for entry in std::fs::read_dir("/usr")
        .map_err(Error::io("read", "/usr"))?
        .flatten()
    {
        let name = entry.file_name();
        if name == "local" {
            continue;
        }
        let target = usr.join(&name);
        let ft = entry.file_type().map_err(Error::io("stat", entry.path()))?;
        if ft.is_symlink() {
            let to = std::fs::read_link(entry.path()).map_err(Error::io("read", entry.path()))?;
            if std::fs::symlink_metadata(&target).is_err() {
                std::os::unix::fs::symlink(to, &target)
                    .map_err(Error::io("link", target.clone()))?;
            }
        } else if ft.is_dir() {
            bind_ro(&entry.path(), &target, true)?;
        }
    }
    for d in [
        "tmp", "run", "var/tmp", "root", "home", "proc", "dev", "sys",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(Error::io("create", root.join(d)))?;
    }
    use std::os::unix::fs::PermissionsExt;
    for d in ["tmp", "var/tmp"] {
        std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o1777))
            .map_err(Error::io("chmod", root.join(d)))?;
    }
    mount_bind_recursive("/dev", root.join("dev"))
        .map_err(errno("bind-mount", &root.join("dev")))?;
    bind_ro(Path::new("/sys"), &root.join("sys"), true)?;
    read_only_beneath(&root.join("sys"))?;
    mount(
        "proc",
        root.join("proc"),
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )
    .map_err(errno("mount proc on", &root.join("proc")))?;
    let hosts = root.join("etc/hosts");
    mount_point(&hosts, false)?;
    mount_bind(&spec.etc_hosts, &hosts).map_err(errno("bind-mount", &hosts))?;
    std::fs::write(root.join("etc/hostname"), format!("{}\n", spec.hostname))
        .map_err(Error::io("write", root.join("etc/hostname")))?;
    for (path, host) in &spec.image_files {
        bind_ro(host, &inside(root, path), false)?;
    }
    let mut mounts = spec.mounts.clone();
    mounts.sort_by_key(|m| m.target.matches('/').count());
    for m in &mounts {
        let target = inside(root, &m.target);
        mount_point(&target, m.source.is_dir())?;
        mount_bind_recursive(&m.source, &target).map_err(errno("bind-mount", &target))?;
        if m.read_only {
            mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, "")
                .map_err(errno("make read-only", &target))?;
        }
        let propagation = match m.propagation.as_str() {
            "HostToContainer" | "Bidirectional" => MountPropagationFlags::DOWNSTREAM,
            _ => MountPropagationFlags::PRIVATE,
        };
        mount_change(&target, propagation | MountPropagationFlags::REC)
            .map_err(errno("set propagation of", &target))?;
    }
    rustix::system::sethostname(spec.hostname.as_bytes())
        .map_err(errno("set the hostname", Path::new("/")))?;
    std::os::unix::fs::chroot(root).map_err(Error::io("chroot into", root))?;
    let cwd = spec.working_dir.clone().unwrap_or_else(|| "/".into());
    std::env::set_current_dir(&cwd).map_err(Error::io("enter the working directory", cwd))?;
    let Some((prog, args)) = spec.argv.split_first() else {
        return Err(Error::Invalid {
            action: "start the container",
            message: "no command: the image has no entrypoint and the container sets none".into(),
        });
    };
    let err = std::process::Command::new(prog)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .exec();
    Err(Error::Invalid {
        action: "start the container",
        message: format!("exec {prog}: {err}"),
    })
}

/// Expands `$(VAR)` references as the kubelet does (`$$` escapes; unknown names stay).
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(")
            && let Some(end) = t.find(')')
        {
            let name = &t[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_lose_registry_tag_and_digest() {
        assert_eq!(
            repository("ghcr.io/stash-rs/stash-node-agent:0.1.0"),
            "stash-node-agent"
        );
        assert_eq!(repository("busybox"), "busybox");
        assert_eq!(repository("localhost:5000/x@sha256:abc"), "x");
    }

    #[test]
    fn references_expand_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_owned(), "1".to_owned())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)", &env), "1-$(B)-$(A)");
    }
}
