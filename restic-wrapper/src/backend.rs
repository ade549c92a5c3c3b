//! Backends and secrets: turns a typed backend description and Stash's Secret keys into the
//! restic repository string, the child's environment and the global flags. Secrets only ever
//! travel in the environment (or in files in the scratch directory), never in arguments.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Where a restic repository lives: the providers of Stash's `Backend` (STASH-API.md §1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A directory on a mounted volume.
    Local {
        path: PathBuf,
    },
    S3 {
        /// `host[:port]`, optionally with `http://` or `https://`.
        endpoint: String,
        bucket: String,
        prefix: String,
        region: Option<String>,
        insecure_tls: bool,
    },
    Gcs {
        bucket: String,
        prefix: String,
        max_connections: Option<u32>,
    },
    Azure {
        container: String,
        prefix: String,
        max_connections: Option<u32>,
    },
    B2 {
        bucket: String,
        prefix: String,
        max_connections: Option<u32>,
    },
    Swift {
        container: String,
        prefix: String,
    },
    /// A restic REST server; the URL path is the prefix.
    Rest {
        url: String,
    },
}

impl Backend {
    /// The restic repository string, without credentials.
    pub fn repository_string(&self) -> String {
        fn join(bucket: &str, prefix: &str) -> String {
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                bucket.to_owned()
            } else {
                format!("{bucket}/{prefix}")
            }
        }
        match self {
            Backend::Local { path } => path.display().to_string(),
            Backend::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            } => format!(
                "s3:{}/{}",
                endpoint.trim_end_matches('/'),
                join(bucket, prefix)
            ),
            Backend::Gcs { bucket, prefix, .. } => {
                format!("gs:{bucket}:/{}", prefix.trim_matches('/'))
            }
            Backend::Azure {
                container, prefix, ..
            } => format!("azure:{container}:/{}", prefix.trim_matches('/')),
            Backend::B2 { bucket, prefix, .. } => {
                format!("b2:{bucket}:/{}", prefix.trim_matches('/'))
            }
            Backend::Swift { container, prefix } => {
                format!("swift:{container}:/{}", prefix.trim_matches('/'))
            }
            Backend::Rest { url } => format!("rest:{url}"),
        }
    }

    /// Parses a restic repository string (`/path`, `s3:…`, `gs:…`, `azure:…`, `b2:…`,
    /// `swift:…`, `rest:…`), the form users pass to `--repo`.
    pub fn parse(repository: &str) -> Result<Backend, Error> {
        let invalid = |why: &str| Error::InvalidRepository {
            repository: repository.to_owned(),
            reason: why.to_owned(),
        };
        // `<bucket>:/<prefix>` of gs, azure, b2 and swift.
        let bucket_prefix = |rest: &str| -> Result<(String, String), Error> {
            let (bucket, prefix) = rest.split_once(':').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("the bucket or container is empty"));
            }
            Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
        };
        if let Some(rest) = repository.strip_prefix("s3:") {
            let (scheme, rest) = match rest.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), rest),
            };
            let mut parts = rest.splitn(3, '/');
            let host = parts.next().unwrap_or_default();
            let bucket = parts.next().unwrap_or_default();
            let prefix = parts.next().unwrap_or_default();
            if host.is_empty() || bucket.is_empty() {
                return Err(invalid("expected s3:<endpoint>/<bucket>[/<prefix>]"));
            }
            return Ok(Backend::S3 {
                endpoint: format!("{scheme}{host}"),
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
                region: None,
                insecure_tls: false,
            });
        }
        if let Some(rest) = repository.strip_prefix("gs:") {
            let (bucket, prefix) = bucket_prefix(rest)?;
            return Ok(Backend::Gcs {
                bucket,
                prefix,
                max_connections: None,
            });
        }
        if let Some(rest) = repository.strip_prefix("azure:") {
            let (container, prefix) = bucket_prefix(rest)?;
            return Ok(Backend::Azure {
                container,
                prefix,
                max_connections: None,
            });
        }
        if let Some(rest) = repository.strip_prefix("b2:") {
            let (bucket, prefix) = bucket_prefix(rest)?;
            return Ok(Backend::B2 {
                bucket,
                prefix,
                max_connections: None,
            });
        }
        if let Some(rest) = repository.strip_prefix("swift:") {
            let (container, prefix) = bucket_prefix(rest)?;
            return Ok(Backend::Swift { container, prefix });
        }
        if let Some(url) = repository.strip_prefix("rest:") {
            return Ok(Backend::Rest {
                url: url.to_owned(),
            });
        }
        if let Some(path) = repository.strip_prefix("local:") {
            return Ok(Backend::Local { path: path.into() });
        }
        let scheme = repository.split_once(':').map(|(s, _)| s);
        if scheme.is_some_and(|s| !s.contains('/') && s.len() > 1) {
            return Err(invalid("unsupported backend"));
        }
        if repository.is_empty() {
            return Err(invalid("the repository is empty"));
        }
        Ok(Backend::Local {
            path: repository.into(),
        })
    }

    fn max_connections(&self) -> Option<(&'static str, u32)> {
        match self {
            Backend::Gcs {
                max_connections: Some(n),
                ..
            } => Some(("gs", *n)),
            Backend::Azure {
                max_connections: Some(n),
                ..
            } => Some(("azure", *n)),
            Backend::B2 {
                max_connections: Some(n),
                ..
            } => Some(("b2", *n)),
            _ => None,
        }
    }
}

/// A secret value. Its `Debug` never shows the value, so secrets cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        SecretValue(value.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The keys of a Stash storage Secret (RESTIC_PASSWORD, AWS_ACCESS_KEY_ID, …).
#[derive(Clone, Debug, Default)]
pub struct Secrets(BTreeMap<String, SecretValue>);

/// Secret keys that become environment variables as they are (STASH-API.md §1.1).
const PASSTHROUGH_KEYS: &[&str] = &[
    "RESTIC_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "GOOGLE_PROJECT_ID",
    "AZURE_ACCOUNT_NAME",
    "AZURE_ACCOUNT_KEY",
    "AZURE_ACCOUNT_SAS",
    "B2_ACCOUNT_ID",
    "B2_ACCOUNT_KEY",
    "ST_AUTH",
    "ST_USER",
    "ST_KEY",
    "OS_AUTH_URL",
    "OS_REGION_NAME",
    "OS_USERNAME",
    "OS_USER_ID",
    "OS_PASSWORD",
    "OS_TENANT_ID",
    "OS_TENANT_NAME",
    "OS_USER_DOMAIN_NAME",
    "OS_USER_DOMAIN_ID",
    "OS_PROJECT_NAME",
    "OS_PROJECT_DOMAIN_NAME",
    "OS_PROJECT_DOMAIN_ID",
    "OS_TRUST_ID",
    "OS_APPLICATION_CREDENTIAL_ID",
    "OS_APPLICATION_CREDENTIAL_NAME",
    "OS_APPLICATION_CREDENTIAL_SECRET",
    "OS_STORAGE_URL",
    "OS_AUTH_TOKEN",
];

/// Keys that are turned into something else rather than passed through.
const CA_CERT_DATA: &str = "CA_CERT_DATA";
const GOOGLE_SERVICE_ACCOUNT_JSON_KEY: &str = "GOOGLE_SERVICE_ACCOUNT_JSON_KEY";
const REST_SERVER_USERNAME: &str = "REST_SERVER_USERNAME";
const REST_SERVER_PASSWORD: &str = "REST_SERVER_PASSWORD";

impl Secrets {
    pub fn new() -> Self {
        Secrets::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.0.insert(key.into(), SecretValue::new(value));
        self
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.insert(key, value);
        self
    }

    /// Every key and value, in key order (to tell whether two sets of secrets are the same).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &SecretValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&SecretValue> {
        self.0.get(key)
    }

    /// Reads the usual restic environment variables (and Stash's extra keys) from this
    /// process's environment, for command-line use outside Kubernetes.
    pub fn from_process_env() -> Self {
        let mut secrets = Secrets::new();
        let extra = [
            CA_CERT_DATA,
            GOOGLE_SERVICE_ACCOUNT_JSON_KEY,
            REST_SERVER_USERNAME,
            REST_SERVER_PASSWORD,
        ];
        for key in PASSTHROUGH_KEYS.iter().chain(extra.iter()) {
            if let Some(value) = std::env::var_os(key) {
                secrets.insert(*key, value.into_encoded_bytes());
            }
        }
        if secrets.get("RESTIC_PASSWORD").is_none()
            && let Some(file) = std::env::var_os("RESTIC_PASSWORD_FILE")
            && let Ok(text) = std::fs::read(file)
        {
            let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
            secrets.insert("RESTIC_PASSWORD", line.to_vec());
        }
        secrets
    }

    /// Every secret value, so captured output can be scrubbed before it is logged.
    pub(crate) fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.0.values().map(SecretValue::expose)
    }
}

/// A repository ready to be used by restic: where it is, what the child's environment holds
/// and which global flags every command gets.
#[derive(Clone, Debug)]
pub struct Repository {
    backend: Backend,
    repository: SecretValue,
    env: Vec<(String, SecretValue)>,
    global_args: Vec<OsString>,
    secrets: Secrets,
}

impl Repository {
    /// Prepares a repository. Files that restic needs on disk (the CA certificate, a GCS
    /// service-account key) are written with mode 0600 into `scratch`, which the caller owns.
    pub fn new(backend: Backend, secrets: Secrets, scratch: &Path) -> Result<Repository, Error> {
        if secrets.get("RESTIC_PASSWORD").is_none() {
            return Err(Error::MissingSecret {
                key: "RESTIC_PASSWORD",
            });
        }
        if matches!(backend, Backend::B2 { .. }) {
            for key in ["B2_ACCOUNT_ID", "B2_ACCOUNT_KEY"] {
                if secrets.get(key).is_none() {
                    return Err(Error::MissingSecret { key });
                }
            }
        }
        let mut env = Vec::new();
        let mut global_args: Vec<OsString> = Vec::new();
        for key in PASSTHROUGH_KEYS {
            if let Some(value) = secrets.get(key) {
                env.push(((*key).to_owned(), value.clone()));
            }
        }
        let mut repository = backend.repository_string().into_bytes();
        match &backend {
            Backend::S3 {
                region,
                insecure_tls,
                ..
            } => {
                if let Some(region) = region {
                    env.push((
                        "AWS_DEFAULT_REGION".into(),
                        SecretValue::new(region.clone()),
                    ));
                }
                if *insecure_tls {
                    global_args.push("--insecure-tls".into());
                }
            }
            Backend::Gcs { .. } => {
                if let Some(key) = secrets.get(GOOGLE_SERVICE_ACCOUNT_JSON_KEY) {
                    let path = write_private(scratch, "gcs-service-account.json", key.expose())?;
                    env.push((
                        "GOOGLE_APPLICATION_CREDENTIALS".into(),
                        SecretValue::new(path.into_os_string().into_encoded_bytes()),
                    ));
                }
            }
            Backend::Rest { url } => {
                // The credentials go into the URL's userinfo; the URL only ever travels in
                // RESTIC_REPOSITORY, never on the command line.
                if let (Some(user), Some(pass)) = (
                    secrets.get(REST_SERVER_USERNAME),
                    secrets.get(REST_SERVER_PASSWORD),
                ) {
                    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
                    let mut with_auth = format!("rest:{scheme}://").into_bytes();
                    with_auth.extend(percent_encode(user.expose()).bytes());
                    with_auth.push(b':');
                    with_auth.extend(percent_encode(pass.expose()).bytes());
                    with_auth.push(b'@');
                    with_auth.extend(rest.bytes());
                    repository = with_auth;
                }
            }
            _ => {}
        }
        if let Some((provider, n)) = backend.max_connections() {
            global_args.push("--option".into());
            global_args.push(format!("{provider}.connections={n}").into());
        }
        if let Some(ca) = secrets.get(CA_CERT_DATA) {
            let path = write_private(scratch, "ca.crt", ca.expose())?;
            global_args.push("--cacert".into());
            global_args.push(path.into_os_string());
        }
        Ok(Repository {
            backend,
            repository: SecretValue::new(repository),
            env,
            global_args,
            secrets,
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The repository string without credentials, safe to show.
    pub fn display_name(&self) -> String {
        self.backend.repository_string()
    }

    pub fn password(&self) -> Option<&SecretValue> {
        self.secrets.get("RESTIC_PASSWORD")
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// The environment of a restic child: RESTIC_REPOSITORY, the password and credentials.
    pub(crate) fn env(&self) -> impl Iterator<Item = (OsString, OsString)> + '_ {
        let repo = (
            OsString::from("RESTIC_REPOSITORY"),
            os_string(self.repository.expose()),
        );
        std::iter::once(repo).chain(
            self.env
                .iter()
                .map(|(k, v)| (OsString::from(k), os_string(v.expose()))),
        )
    }

    pub(crate) fn global_args(&self) -> &[OsString] {
        &self.global_args
    }
}

fn os_string(bytes: &[u8]) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    OsString::from_vec(bytes.to_vec())
}

fn write_private(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf, Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|source| Error::WriteScratchFile {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// Percent-encodes userinfo so a password with `@`, `:` or `/` stays one component.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3() -> Backend {
        Backend::S3 {
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "stash".into(),
            prefix: "demo/app".into(),
            region: Some("garage".into()),
            insecure_tls: true,
        }
    }

    #[test]
    fn repository_strings_follow_stash() {
        assert_eq!(
            s3().repository_string(),
            "s3:http://127.0.0.1:3900/stash/demo/app"
        );
        let gcs = Backend::Gcs {
            bucket: "b".into(),
            prefix: "/p/q/".into(),
            max_connections: Some(4),
        };
        assert_eq!(gcs.repository_string(), "gs:b:/p/q");
        let azure = Backend::Azure {
            container: "c".into(),
            prefix: "p".into(),
            max_connections: None,
        };
        assert_eq!(azure.repository_string(), "azure:c:/p");
        let rest = Backend::Rest {
            url: "https://rest:8000/repo".into(),
        };
        assert_eq!(rest.repository_string(), "rest:https://rest:8000/repo");
        let local = Backend::Local {
            path: "/safe/data".into(),
        };
        assert_eq!(local.repository_string(), "/safe/data");
    }

    #[test]
    fn repository_strings_parse_back() -> Result<(), Error> {
        for backend in [
            s3(),
            Backend::Gcs {
                bucket: "b".into(),
                prefix: "p/q".into(),
                max_connections: None,
            },
            Backend::B2 {
                bucket: "b".into(),
                prefix: String::new(),
                max_connections: None,
            },
            Backend::Swift {
                container: "c".into(),
                prefix: "x".into(),
            },
            Backend::Rest {
                url: "http://h:1/r".into(),
            },
            Backend::Local {
                path: "/tmp/repo".into(),
            },
        ] {
            let parsed = Backend::parse(&backend.repository_string())?;
            assert_eq!(parsed.repository_string(), backend.repository_string());
        }
        assert!(Backend::parse("sftp:host:/x").is_err());
        assert!(Backend::parse("s3:host").is_err());
        Ok(())
    }

    #[test]
    fn secrets_go_to_the_environment_and_files_never_to_arguments() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|source| Error::WriteScratchFile {
            path: "tmp".into(),
            source,
        })?;
        let secrets = Secrets::new()
            .with("RESTIC_PASSWORD", "s3cr3t-pw")
            .with("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .with("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
            .with("CA_CERT_DATA", "-----BEGIN CERTIFICATE-----");
        let repo = Repository::new(s3(), secrets, dir.path())?;
        let env: Vec<(OsString, OsString)> = repo.env().collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("RESTIC_PASSWORD"), Some("s3cr3t-pw".into()));
        assert_eq!(get("AWS_DEFAULT_REGION"), Some("garage".into()));
        assert_eq!(
            get("RESTIC_REPOSITORY"),
            Some("s3:http://127.0.0.1:3900/stash/demo/app".into())
        );
        let args: Vec<String> = repo
            .global_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "--insecure-tls");
        assert_eq!(args[1], "--cacert");
        let ca = std::fs::read_to_string(&args[2]).unwrap_or_default();
        assert_eq!(ca, "-----BEGIN CERTIFICATE-----");
        let joined = args.join(" ");
        for secret in ["s3cr3t-pw", "AKIDEXAMPLE", "wJalrXUtnFEMI"] {
            assert!(!joined.contains(secret));
            assert!(
                !format!("{repo:?}").contains(secret),
                "Debug shows {secret}"
            );
        }
        Ok(())
    }

    #[test]
    fn rest_credentials_ride_in_the_repository_url() -> Result<(), Error> {
        let dir = std::env::temp_dir();
        let secrets = Secrets::new()
            .with("RESTIC_PASSWORD", "pw")
            .with("REST_SERVER_USERNAME", "bob")
            .with("REST_SERVER_PASSWORD", "p@ss:w/rd");
        let backend = Backend::Rest {
            url: "https://rest.example:8000/bob".into(),
        };
        let repo = Repository::new(backend, secrets, &dir)?;
        let env: Vec<_> = repo.env().collect();
        assert_eq!(
            env[0].1,
            OsString::from("rest:https://bob:p%40ss%3Aw%2Frd@rest.example:8000/bob")
        );
        assert_eq!(repo.display_name(), "rest:https://rest.example:8000/bob");
        Ok(())
    }

    #[test]
    fn missing_password_and_b2_keys_are_refused() {
        let dir = std::env::temp_dir();
        let local = Backend::Local { path: "/r".into() };
        assert!(matches!(
            Repository::new(local, Secrets::new(), &dir),
            Err(Error::MissingSecret {
                key: "RESTIC_PASSWORD"
            })
        ));
        let b2 = Backend::B2 {
            bucket: "b".into(),
            prefix: String::new(),
            max_connections: Some(2),
        };
        let secrets = Secrets::new().with("RESTIC_PASSWORD", "x");
        assert!(matches!(
            Repository::new(b2, secrets, &dir),
            Err(Error::MissingSecret {
                key: "B2_ACCOUNT_ID"
            })
        ));
    }
}
