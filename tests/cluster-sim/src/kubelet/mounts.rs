//! The bind mounts a kubelet makes in the host's mount namespace (its shared root, CSI
//! staging and publish mounts, local volumes), recorded so every one is undone on teardown
//! and on drop.

use crate::error::{Error, Result};
use rustix::mount::{
    MountPropagationFlags, UnmountFlags, mount_bind, mount_bind_recursive, mount_change, unmount,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Mounts {
    made: Mutex<Vec<PathBuf>>,
}

impl Mounts {
    fn made(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.made
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn is_mounted(&self, target: &Path) -> bool {
        self.made().iter().any(|p| p == target)
    }

    /// Bind-mounts `src` onto `dst` (a directory, or a file for block volumes) once.
    pub fn bind(&self, src: &Path, dst: &Path) -> Result<()> {
        if self.is_mounted(dst) {
            return Ok(());
        }
        if src.is_dir() {
            std::fs::create_dir_all(dst).map_err(Error::io("create the mount point", dst))?;
        } else {
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(Error::io("create the mount point", parent))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dst)
                .map_err(Error::io("create the mount point", dst))?;
        }
        mount_bind(src, dst).map_err(|e| Error::io("bind-mount onto", dst)(e.into()))?;
        self.made().push(dst.to_owned());
        Ok(())
    }

    /// Bind-mounts the directory `src` onto `dst` with every mount beneath it, once.
    pub fn bind_recursive(&self, src: &Path, dst: &Path) -> Result<()> {
        if self.is_mounted(dst) {
            return Ok(());
        }
        std::fs::create_dir_all(dst).map_err(Error::io("create the mount point", dst))?;
        mount_bind_recursive(src, dst).map_err(|e| Error::io("bind-mount onto", dst)(e.into()))?;
        self.made().push(dst.to_owned());
        Ok(())
    }

    /// Makes `dir` a shared mount point (the kubelet makes its root rshared so mounts made
    /// under it after a container started reach containers that asked for
    /// HostToContainer propagation).
    pub fn make_rshared(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        if !self.is_mounted(dir) {
            mount_bind_recursive(dir, dir)
                .map_err(|e| Error::io("bind-mount onto itself", dir)(e.into()))?;
            self.made().push(dir.to_owned());
        }
        mount_change(
            dir,
            MountPropagationFlags::SHARED | MountPropagationFlags::REC,
        )
        .map_err(|e| Error::io("make shared", dir)(e.into()))
    }

    /// Unmounts one target this registry made (lazily, so a busy mount still goes).
    pub fn unmount(&self, target: &Path) -> Result<()> {
        let mut made = self.made();
        let Some(i) = made.iter().rposition(|p| p == target) else {
            return Ok(());
        };
        made.remove(i);
        drop(made);
        match unmount(target, UnmountFlags::DETACH) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io("unmount", target)(e.into())),
        }
    }

    /// Unmounts everything under `prefix`, deepest first.
    pub fn unmount_under(&self, prefix: &Path) {
        let mut targets: Vec<PathBuf> = self
            .made()
            .iter()
            .filter(|p| p.starts_with(prefix))
            .cloned()
            .collect();
        targets.reverse();
        for t in targets {
            if let Err(error) = self.unmount(&t) {
                tracing::warn!(%error, "unmount failed");
            }
        }
    }

    pub fn unmount_all(&self) {
        let targets: Vec<PathBuf> = self.made().iter().rev().cloned().collect();
        for t in targets {
            if let Err(error) = self.unmount(&t) {
                tracing::warn!(%error, "unmount failed");
            }
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        self.unmount_all();
    }
}
