//! The Snapshot API's serving certificate: issued by the operator itself (a CA of its own and a
//! certificate for the Service's DNS names, kept in a Secret so every replica serves the same,
//! and the CA written into the APIService's caBundle), or cert-manager's, read from the
//! mounted Secret.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use super::object::API_SERVICE;
use crate::cli::{CertSource, RunArgs};
use crate::error::{Error, is_conflict, is_not_found};

/// How long a self-issued certificate is valid, and how long before its end it is replaced.
const VALID_DAYS: i64 = 365;
const RENEW_DAYS: i64 = 30;

/// A serving certificate, its key and the CA that verifies it, all PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").finish_non_exhaustive()
    }
}

/// The names the aggregator (and anyone in the cluster) reaches the Service by.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn issue_failed(e: rcgen::Error) -> Error {
    Error::Invalid {
        action: "issue the serving certificate",
        reason: e.to_string(),
    }
}

/// Midnight UTC of `t`'s day, as the certificate library takes dates.
fn day_of(t: jiff::Timestamp) -> (i32, u8, u8) {
    let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
    (i32::from(d.year()), d.month() as u8, d.day() as u8)
}

/// A fresh CA and a serving certificate it signed for `names`, valid from today for a year.
pub fn issue(names: &[String], now: jiff::Timestamp) -> Result<Serving, Error> {
    let (y, m, d) = day_of(now);
    let (ey, em, ed) = day_of(
        now.checked_add(jiff::SignedDuration::from_hours(24 * VALID_DAYS))
            .unwrap_or(now),
    );
    let ca_key = KeyPair::generate().map_err(issue_failed)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(issue_failed)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "stash-operator-ca");
    ca.not_before = rcgen::date_time_ymd(y, m, d);
    ca.not_after = rcgen::date_time_ymd(ey, em, ed);
    let ca_cert = ca.self_signed(&ca_key).map_err(issue_failed)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(issue_failed)?;
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(issue_failed)?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "stash".into()),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = rcgen::date_time_ymd(y, m, d);
    leaf.not_after = rcgen::date_time_ymd(ey, em, ed);
    let cert = leaf.signed_by(&key, &issuer).map_err(issue_failed)?;
    Ok(Serving {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: ca_cert.pem(),
    })
}

/// Whether a PEM certificate is still good for a while and names every one of `names`.
pub fn still_good(cert_pem: &str, names: &[String], now: jiff::Timestamp) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next() else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let renew_at = now.as_second() + RENEW_DAYS * 24 * 3600;
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    cert.validity().not_after.timestamp() > renew_at && names.iter().all(|n| sans.contains(n))
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|s| !s.is_empty())
}

/// The certificate to serve with: cert-manager's from the mounted Secret, or the operator's
/// own, issued when the Secret lacks a good one (every replica then reads the same).
pub async fn ensure(client: &kube::Client, args: &RunArgs) -> Result<Serving, Error> {
    let api_args = &args.snapshot_api;
    if api_args.cert_source == CertSource::CertManager {
        let read = |name: &str| {
            std::fs::read_to_string(api_args.cert_dir.join(name)).map_err(|source| Error::Io {
                action: "read the serving certificate from its mounted Secret",
                source,
            })
        };
        return Ok(Serving {
            cert_pem: read("tls.crt")?,
            key_pem: read("tls.key")?,
            ca_pem: read("ca.crt").unwrap_or_default(),
        });
    }
    let names = dns_names(&api_args.service_name, &args.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let name = &api_args.cert_secret_name;
    let now = jiff::Timestamp::now();
    let existing = secrets
        .get_opt(name)
        .await
        .map_err(Error::kube("read the serving certificate's Secret"))?;
    let current = existing.as_ref().and_then(|s| {
        let data = s.data.clone().unwrap_or_default();
        Some(Serving {
            cert_pem: text(&data, "tls.crt")?,
            key_pem: text(&data, "tls.key")?,
            ca_pem: text(&data, "ca.crt")?,
        })
    });
    let serving = match current {
        Some(c) if still_good(&c.cert_pem, &names, now) => c,
        _ => {
            let fresh = issue(&names, now)?;
            let data: BTreeMap<String, ByteString> = [
                ("tls.crt", &fresh.cert_pem),
                ("tls.key", &fresh.key_pem),
                ("ca.crt", &fresh.ca_pem),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
            .collect();
            let mut secret = existing.unwrap_or_else(|| Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(args.namespace.clone()),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                ..Secret::default()
            });
            secret.data = Some(data);
            let written = if secret.metadata.resource_version.is_some() {
                secrets.replace(name, &PostParams::default(), &secret).await
            } else {
                secrets.create(&PostParams::default(), &secret).await
            };
            match written {
                Ok(_) => fresh,
                // Another replica wrote one first: serve that one.
                Err(e) if is_conflict(&e) => {
                    return Box::pin(ensure(client, args)).await;
                }
                Err(e) => return Err(Error::kube("write the serving certificate's Secret")(e)),
            }
        }
    };
    write_ca_bundle(client, &serving.ca_pem).await?;
    Ok(serving)
}

/// Points the APIService's trust at the operator's CA.
async fn write_ca_bundle(client: &kube::Client, ca_pem: &str) -> Result<(), Error> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    );
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let patch = serde_json::json!({"spec": {"caBundle": bundle}});
    match Api::<DynamicObject>::all_with(client.clone(), &ar)
        .patch(API_SERVICE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // Not registered (the operator run outside the chart): nothing to point.
        Err(e) if is_not_found(&e) => {
            tracing::warn!(
                apiservice = API_SERVICE,
                "no APIService to write the caBundle into"
            );
            Ok(())
        }
        Err(e) => Err(Error::kube("write the APIService's caBundle")(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_issued_certificate_names_the_service_and_is_good_for_a_year() {
        let names = dns_names("stash", "stash");
        assert_eq!(names[2], "stash.stash.svc");
        let now = jiff::Timestamp::now();
        let s = issue(&names, now).unwrap();
        assert!(s.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(s.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(still_good(&s.cert_pem, &names, now));
        // Renewed within the last month of its year, and for other names.
        let late = now
            .checked_add(jiff::SignedDuration::from_hours(24 * 340))
            .unwrap();
        assert!(!still_good(&s.cert_pem, &names, late));
        assert!(!still_good(&s.cert_pem, &dns_names("other", "stash"), now));
        assert!(!still_good("not pem", &names, now));
    }
}
