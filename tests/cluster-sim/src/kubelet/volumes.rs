//! A pod's volumes as the kubelet lays them out under `pods/<uid>/`: emptyDir, Secret,
//! ConfigMap, downward API and projected volumes (written atomically through `..data`),
//! hostPath inside the node root, and PVCs: CSI staging at the driver's global mount,
//! bind-mounted into each pod's `kubernetes.io~csi/<pv>/mount`, local and hostPath PVs.

use super::mounts::Mounts;
use crate::error::{Error, Result};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod,
    Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a volume is not ready yet; the pod waits in `ContainerCreating` with this message.
#[derive(Debug)]
pub struct NotReady(pub String);

pub type SetupResult<T> = std::result::Result<T, SetupError>;

#[derive(Debug)]
pub enum SetupError {
    NotReady(NotReady),
    Failed(Error),
}

impl From<Error> for SetupError {
    fn from(e: Error) -> Self {
        Self::Failed(e)
    }
}

fn not_ready(m: impl Into<String>) -> SetupError {
    SetupError::NotReady(NotReady(m.into()))
}

/// What a container mounts for a volume: a directory, or a file for block devices.
#[derive(Debug, Clone)]
pub struct HostVolume {
    pub path: PathBuf,
    pub block: bool,
}

pub struct Layout<'a> {
    pub client: &'a Client,
    pub node_name: &'a str,
    pub node_root: &'a Path,
    pub kubelet_root: &'a Path,
    pub csi_root: &'a Path,
    pub driver: &'a str,
    pub mounts: &'a Mounts,
}

/// `utilstrings.EscapeQualifiedName`.
fn escape(plugin: &str) -> String {
    plugin.replace('/', "~")
}

pub fn pod_dir(kubelet_root: &Path, uid: &str) -> PathBuf {
    kubelet_root.join("pods").join(uid)
}

/// A path of the node's filesystem, inside the node root.
pub fn on_node(node_root: &Path, path: &str) -> PathBuf {
    node_root.join(path.trim_start_matches('/'))
}

/// The CSI staging path: `plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount`.
pub fn csi_global_mount(kubelet_root: &Path, driver: &str, handle: &str) -> PathBuf {
    let sum = hex::encode(Sha256::digest(handle.as_bytes()));
    kubelet_root
        .join("plugins/kubernetes.io/csi")
        .join(driver)
        .join(sum)
        .join("globalmount")
}

/// Writes `files` into `dir` as the kubelet's AtomicWriter does: a fresh hidden timestamped
/// directory, `..data` switched to it by renaming `..data_tmp`, and each visible name a
/// symlink into `..data`. Nothing is written when the content is unchanged.
pub fn write_atomic(dir: &Path, files: &BTreeMap<String, (Vec<u8>, u32)>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io("create the volume directory", dir))?;
    let data = dir.join("..data");
    let unchanged = files
        .iter()
        .all(|(k, (bytes, _))| std::fs::read(data.join(k)).is_ok_and(|b| b == *bytes))
        && std::fs::read_link(&data).is_ok()
        && list_visible(dir).len() == top_level(files).len();
    if unchanged {
        return Ok(());
    }
    let now = jiff::Timestamp::now()
        .strftime("%Y_%m_%d_%H_%M_%S")
        .to_string();
    let ts_name = format!("..{now}.{}", crate::hash::random_suffix(10));
    let ts = dir.join(&ts_name);
    for (k, (bytes, mode)) in files {
        let p = ts.join(k);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
        }
        std::fs::write(&p, bytes).map_err(Error::io("write", p.clone()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(Error::io("chmod", p.clone()))?;
    }
    let old = std::fs::read_link(&data).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts_name, &tmp).map_err(Error::io("link", tmp.clone()))?;
    std::fs::rename(&tmp, &data).map_err(Error::io("switch", data.clone()))?;
    let wanted = top_level(files);
    for name in list_visible(dir) {
        if !wanted.contains(&name) {
            let _ = std::fs::remove_file(dir.join(&name));
        }
    }
    for name in &wanted {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)
                .map_err(Error::io("link", link.clone()))?;
        }
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn top_level(files: &BTreeMap<String, (Vec<u8>, u32)>) -> std::collections::BTreeSet<String> {
    files
        .keys()
        .map(|k| k.split('/').next().unwrap_or(k).to_owned())
        .collect()
}

fn list_visible(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".."))
        .collect()
}

/// Keys as files, or the listed items with their paths and modes.
fn project(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
    optional: bool,
    what: &str,
) -> SetupResult<BTreeMap<String, (Vec<u8>, u32)>> {
    let mut out = BTreeMap::new();
    match items {
        None => {
            for (k, v) in data {
                out.insert(k, (v, default_mode));
            }
        }
        Some(items) => {
            for it in items {
                match data.get(&it.key) {
                    Some(v) => {
                        let mode = it
                            .mode
                            .map_or(default_mode, |m| u32::try_from(m).unwrap_or(default_mode));
                        out.insert(it.path.clone(), (v.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(not_ready(format!(
                            "configmap or secret references non-existent key {}: {what}",
                            it.key
                        )));
                    }
                }
            }
        }
    }
    Ok(out)
}

async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> SetupResult<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("read Secret {ns}/{name}")))?
    {
        Some(s) => {
            let mut m: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                m.insert(k, v.into_bytes());
            }
            Ok(Some(m))
        }
        None if optional => Ok(None),
        None => Err(not_ready(format!("secret \"{name}\" not found"))),
    }
}

async fn configmap_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> SetupResult<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("read ConfigMap {ns}/{name}")))?
    {
        Some(c) => {
            let mut m: BTreeMap<String, Vec<u8>> = c
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (k, v) in c.binary_data.unwrap_or_default() {
                m.insert(k, v.0);
            }
            Ok(Some(m))
        }
        None if optional => Ok(None),
        None => Err(not_ready(format!("configmap \"{name}\" not found"))),
    }
}

/// A downward-API field of the pod (`fieldRef` paths the API accepts).
pub fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    let keyed = |prefix: &str, map: &BTreeMap<String, String>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.get(key).cloned().unwrap_or_default())
    };
    let format_map = |map: &BTreeMap<String, String>| {
        map.iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => m.name.clone(),
        "metadata.namespace" => m.namespace.clone(),
        "metadata.uid" => m.uid.clone(),
        "metadata.labels" => Some(format_map(&m.labels.clone().unwrap_or_default())),
        "metadata.annotations" => Some(format_map(&m.annotations.clone().unwrap_or_default())),
        "spec.nodeName" => spec?.node_name.clone(),
        "spec.serviceAccountName" => spec?.service_account_name.clone(),
        "status.hostIP" => status?.host_ip.clone(),
        "status.hostIPs" => status?.host_ip.clone(),
        "status.podIP" => status?.pod_ip.clone(),
        "status.podIPs" => status?.pod_ip.clone(),
        _ => keyed("metadata.labels['", &m.labels.clone().unwrap_or_default()).or_else(|| {
            keyed(
                "metadata.annotations['",
                &m.annotations.clone().unwrap_or_default(),
            )
        }),
    }
}

/// A `resourceFieldRef` (limits fall back to the node's capacity when unset, as documented).
pub fn resource_value(
    pod: &Pod,
    container: Option<&str>,
    resource: &str,
    divisor: Option<&str>,
) -> String {
    let c = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .find(|c| container.is_none_or(|n| c.name == n));
    let (kind, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let res = c.and_then(|c| c.resources.as_ref());
    let q = match kind {
        "requests" => res
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(name)),
        _ => res
            .and_then(|r| r.limits.as_ref())
            .and_then(|r| r.get(name)),
    };
    let bytes = q
        .map(crate::controllers::volume::quantity_bytes)
        .unwrap_or(match (kind, name) {
            ("requests", _) => 0.0,
            (_, "cpu") => 2.0,
            (_, "memory") => 8.0 * 1024f64.powi(3),
            _ => 100.0 * 1024f64.powi(3),
        });
    let div = divisor
        .map(|d| {
            crate::controllers::volume::quantity_bytes(
                &k8s_openapi::apimachinery::pkg::api::resource::Quantity(d.into()),
            )
        })
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    format!("{}", (bytes / div).ceil() as i64)
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
) -> BTreeMap<String, (Vec<u8>, u32)> {
    let mut out = BTreeMap::new();
    for it in items {
        let v = if let Some(f) = &it.field_ref {
            field_value(pod, &f.field_path).unwrap_or_default()
        } else if let Some(r) = &it.resource_field_ref {
            resource_value(
                pod,
                r.container_name.as_deref(),
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
            )
        } else {
            continue;
        };
        let mode = it
            .mode
            .map_or(default_mode, |m| u32::try_from(m).unwrap_or(default_mode));
        out.insert(it.path.clone(), (v.into_bytes(), mode));
    }
    out
}

/// The kubelet's token manager: a TokenRequest bound to the pod, renewed after 80% of its
/// lifetime.
#[derive(Debug, Default)]
pub struct Tokens {
    cache: std::sync::Mutex<BTreeMap<String, (String, jiff::Timestamp, jiff::Timestamp)>>,
}

impl Tokens {
    pub async fn get(
        &self,
        client: &Client,
        pod: &Pod,
        audience: Option<&str>,
        seconds: i64,
    ) -> SetupResult<String> {
        let ns = pod.namespace().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let key = format!(
            "{}/{sa}/{}/{seconds}",
            pod.uid().unwrap_or_default(),
            audience.unwrap_or("")
        );
        let now = jiff::Timestamp::now();
        if let Some((t, issued, exp)) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            let life = exp.duration_since(*issued);
            let renew_at = *issued + life.mul_f64(0.8).min(jiff::SignedDuration::from_hours(24));
            if now < renew_at {
                return Ok(t.clone());
            }
        }
        let req: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": audience.map(|a| vec![a]).unwrap_or_default(),
                "expirationSeconds": seconds,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.name_any(), "uid": pod.uid()},
            },
        }))
        .map_err(|e| Error::Invalid { action: "build a TokenRequest", message: e.to_string() })?;
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        let resp: TokenRequest = match api
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
        {
            Ok(r) => r,
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 405 => {
                return Err(not_ready(format!(
                    "failed to fetch token: the API server does not serve serviceaccounts/token for {ns}/{sa}: {}",
                    s.message
                )));
            }
            Err(source) => {
                return Err(Error::Kube {
                    action: format!("request a token for {ns}/{sa}"),
                    source,
                }
                .into());
            }
        };
        let status = resp
            .status
            .ok_or_else(|| not_ready("the TokenRequest answer has no status"))?;
        let exp = status.expiration_timestamp.0;
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (status.token.clone(), now, exp));
        Ok(status.token)
    }

    pub fn forget(&self, uid: &str) {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|k, _| !k.starts_with(uid));
    }
}

fn mode_of(m: Option<i32>) -> u32 {
    m.and_then(|m| u32::try_from(m).ok()).unwrap_or(0o644)
}

impl Layout<'_> {
    /// Sets up (or refreshes) every volume of the pod; returns each volume's host path.
    /// `globals` receives the node-wide mounts the pod uses (CSI staging, block publish).
    pub async fn setup(
        &self,
        pod: &Pod,
        tokens: &Tokens,
        globals: &mut Vec<PathBuf>,
    ) -> SetupResult<BTreeMap<String, HostVolume>> {
        let uid = pod.uid().unwrap_or_default();
        let dir = pod_dir(self.kubelet_root, &uid);
        for sub in ["volumes", "volumeDevices", "volume-subpaths", "plugins"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(Error::io("create", dir.join(sub)))?;
        }
        let mut out = BTreeMap::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let hv = self.setup_one(pod, &dir, v, tokens, globals).await?;
            if let Some(hv) = hv {
                out.insert(v.name.clone(), hv);
            }
        }
        Ok(out)
    }

    async fn setup_one(
        &self,
        pod: &Pod,
        dir: &Path,
        v: &Volume,
        tokens: &Tokens,
        globals: &mut Vec<PathBuf>,
    ) -> SetupResult<Option<HostVolume>> {
        let ns = pod.namespace().unwrap_or_default();
        let plugin_dir = |plugin: &str| dir.join("volumes").join(escape(plugin)).join(&v.name);
        let dirv = |p: PathBuf| {
            Some(HostVolume {
                path: p,
                block: false,
            })
        };
        if v.empty_dir.is_some() {
            let p = plugin_dir("kubernetes.io/empty-dir");
            std::fs::create_dir_all(&p).map_err(Error::io("create", p.clone()))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777))
                .map_err(Error::io("chmod", p.clone()))?;
            return Ok(dirv(p));
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let optional = s.optional == Some(true);
            let data = secret_data(self.client, &ns, &name, optional)
                .await?
                .unwrap_or_default();
            let files = project(
                data,
                s.items.as_deref(),
                mode_of(s.default_mode),
                optional,
                &name,
            )?;
            let p = plugin_dir("kubernetes.io/secret");
            write_atomic(&p, &files)?;
            return Ok(dirv(p));
        }
        if let Some(c) = &v.config_map {
            let optional = c.optional == Some(true);
            let data = configmap_data(self.client, &ns, &c.name, optional)
                .await?
                .unwrap_or_default();
            let files = project(
                data,
                c.items.as_deref(),
                mode_of(c.default_mode),
                optional,
                &c.name,
            )?;
            let p = plugin_dir("kubernetes.io/configmap");
            write_atomic(&p, &files)?;
            return Ok(dirv(p));
        }
        if let Some(d) = &v.downward_api {
            let files = downward_files(
                pod,
                d.items.as_deref().unwrap_or_default(),
                mode_of(d.default_mode),
            );
            let p = plugin_dir("kubernetes.io/downward-api");
            write_atomic(&p, &files)?;
            return Ok(dirv(p));
        }
        if let Some(pr) = &v.projected {
            let default_mode = mode_of(pr.default_mode);
            let mut files = BTreeMap::new();
            for src in pr.sources.iter().flatten() {
                if let Some(t) = &src.service_account_token {
                    let token = tokens
                        .get(
                            self.client,
                            pod,
                            t.audience.as_deref(),
                            t.expiration_seconds.unwrap_or(3600),
                        )
                        .await?;
                    files.insert(t.path.clone(), (token.into_bytes(), default_mode));
                }
                if let Some(c) = &src.config_map {
                    let optional = c.optional == Some(true);
                    let data = configmap_data(self.client, &ns, &c.name, optional)
                        .await?
                        .unwrap_or_default();
                    files.extend(project(
                        data,
                        c.items.as_deref(),
                        default_mode,
                        optional,
                        &c.name,
                    )?);
                }
                if let Some(s) = &src.secret {
                    let optional = s.optional == Some(true);
                    let data = secret_data(self.client, &ns, &s.name, optional)
                        .await?
                        .unwrap_or_default();
                    files.extend(project(
                        data,
                        s.items.as_deref(),
                        default_mode,
                        optional,
                        &s.name,
                    )?);
                }
                if let Some(d) = &src.downward_api {
                    files.extend(downward_files(
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        default_mode,
                    ));
                }
            }
            let p = plugin_dir("kubernetes.io/projected");
            write_atomic(&p, &files)?;
            return Ok(dirv(p));
        }
        if let Some(h) = &v.host_path {
            return Ok(dirv(self.host_path(&h.path, h.type_.as_deref())?));
        }
        if let Some(claim) = &v.persistent_volume_claim {
            return self
                .claim(pod, dir, &claim.claim_name, globals)
                .await
                .map(Some);
        }
        // Other volume types (nfs, iscsi, image, …) are not simulated; containers see no mount.
        Ok(None)
    }

    /// hostPath inside the node root, with the type checks of the hostPath plugin.
    fn host_path(&self, path: &str, type_: Option<&str>) -> SetupResult<PathBuf> {
        let p = on_node(self.node_root, path);
        let fail = |what: &str| {
            not_ready(format!(
                "hostPath type check failed: {path} is not a {what}"
            ))
        };
        match type_.unwrap_or("") {
            "DirectoryOrCreate" => {
                std::fs::create_dir_all(&p).map_err(Error::io("create", p.clone()))?;
            }
            "Directory" if !p.is_dir() => return Err(fail("directory")),
            "FileOrCreate" => {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(Error::io("create", p.clone()))?;
            }
            "File" if !p.is_file() => return Err(fail("file")),
            "Socket" | "CharDevice" | "BlockDevice" if !p.exists() => {
                return Err(fail(type_.unwrap_or("")));
            }
            _ => {}
        }
        Ok(p)
    }

    async fn claim(
        &self,
        pod: &Pod,
        dir: &Path,
        claim: &str,
        globals: &mut Vec<PathBuf>,
    ) -> SetupResult<HostVolume> {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
        let pvc = api
            .get_opt(claim)
            .await
            .map_err(Error::kube(format!("read PVC {ns}/{claim}")))?
            .ok_or_else(|| not_ready(format!("persistentvolumeclaim \"{claim}\" not found")))?;
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let Some(pv_name) = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|_| bound)
        else {
            return Err(not_ready(format!(
                "persistentvolumeclaim \"{claim}\" is not bound"
            )));
        };
        let pv_api: Api<PersistentVolume> = Api::all(self.client.clone());
        let pv = pv_api
            .get_opt(&pv_name)
            .await
            .map_err(Error::kube(format!("read PV {pv_name}")))?
            .ok_or_else(|| not_ready(format!("persistentvolume \"{pv_name}\" not found")))?;
        let spec = pv.spec.clone().unwrap_or_default();
        let block = spec.volume_mode.as_deref() == Some("Block");
        let uid = pod.uid().unwrap_or_default();
        if let Some(csi) = &spec.csi {
            if csi.driver != self.driver {
                return Err(not_ready(format!(
                    "kubernetes.io/csi: mounter.SetUpAt failed to get CSI client: driver name {} not found in the list of registered CSI drivers",
                    csi.driver
                )));
            }
            let backing = self.csi_root.join(&csi.volume_handle);
            if block {
                // Block: the device is published per pod from the driver's volumeDevices dir.
                if !backing.exists() {
                    return Err(not_ready(format!(
                        "volume {pv_name} has no data on the storage backend"
                    )));
                }
                let global = self
                    .kubelet_root
                    .join("plugins/kubernetes.io/csi/volumeDevices/publish")
                    .join(&pv_name)
                    .join(&uid);
                self.mounts.bind(&backing, &global)?;
                globals.push(global.clone());
                let map = dir
                    .join("volumeDevices")
                    .join(escape("kubernetes.io/csi"))
                    .join(&pv_name);
                self.mounts.bind(&global, &map)?;
                return Ok(HostVolume {
                    path: map,
                    block: true,
                });
            }
            std::fs::create_dir_all(&backing).map_err(Error::io("create", backing.clone()))?;
            let global = csi_global_mount(self.kubelet_root, &csi.driver, &csi.volume_handle);
            if let Some(parent) = global.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
                let vd = serde_json::json!({"driverName": csi.driver, "volumeHandle": csi.volume_handle});
                std::fs::write(parent.join("vol_data.json"), vd.to_string())
                    .map_err(Error::io("write", parent.join("vol_data.json")))?;
            }
            self.mounts.bind(&backing, &global)?;
            globals.push(global.clone());
            let vol = dir
                .join("volumes")
                .join(escape("kubernetes.io/csi"))
                .join(&pv_name);
            std::fs::create_dir_all(&vol).map_err(Error::io("create", vol.clone()))?;
            let vd = serde_json::json!({
                "specVolID": pv_name, "volumeHandle": csi.volume_handle, "driverName": csi.driver,
                "nodeName": self.node_name, "attachmentID": "", "volumeLifecycleMode": "Persistent",
                "seLinuxMountContext": "",
            });
            std::fs::write(vol.join("vol_data.json"), vd.to_string())
                .map_err(Error::io("write", vol.join("vol_data.json")))?;
            let mount = vol.join("mount");
            self.mounts.bind(&global, &mount)?;
            return Ok(HostVolume {
                path: mount,
                block: false,
            });
        }
        if let Some(local) = &spec.local {
            let src = on_node(self.node_root, &local.path);
            if !src.exists() {
                return Err(not_ready(format!("path \"{}\" does not exist", local.path)));
            }
            let vol = dir
                .join("volumes")
                .join(escape("kubernetes.io/local-volume"))
                .join(&pv_name);
            self.mounts.bind(&src, &vol)?;
            return Ok(HostVolume { path: vol, block });
        }
        if let Some(h) = &spec.host_path {
            return Ok(HostVolume {
                path: self.host_path(&h.path, h.type_.as_deref())?,
                block: false,
            });
        }
        Err(not_ready(format!(
            "the volume plugin of persistentvolume \"{pv_name}\" is not simulated"
        )))
    }

    /// Undoes the pod's mounts and removes its directory, then the node-wide mounts it
    /// used that no other pod of this node still uses.
    pub fn teardown(&self, uid: &str, globals: &[PathBuf], still_used: &dyn Fn(&Path) -> bool) {
        let dir = pod_dir(self.kubelet_root, uid);
        self.mounts.unmount_under(&dir);
        for g in globals {
            if !still_used(g) {
                self.mounts.unmount_under(g);
            }
        }
        // Never delete through a mount that is still there: it would delete the volume.
        if mounted_under(&dir) {
            tracing::warn!(dir = %dir.display(), "a mount is left under the pod directory; keeping it");
            return;
        }
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %dir.display(), "failed to remove the pod directory");
        }
    }
}

/// Whether any mount point of this mount namespace lies under `dir`.
pub fn mounted_under(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .any(|p| p.starts_with(dir))
}

impl std::fmt::Debug for Layout<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout")
            .field("node", &self.node_name)
            .finish()
    }
}
