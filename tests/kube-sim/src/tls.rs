//! Certificates: the cluster CA that signs kube-sim's serving certificate and the client
//! certificates users and components authenticate with (CN = user, O = groups), the front-proxy
//! CA for aggregated API servers, test webhook / aggregated API server identities, and the TLS
//! clients the server uses to call them (trusting a `caBundle`).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to generate a certificate: {0}")]
    GenerateCertificate(#[from] rcgen::Error),
    #[error("failed to build a TLS configuration: {0}")]
    BuildConfig(#[from] rustls::Error),
    #[error("failed to parse PEM data: {0}")]
    ParsePem(String),
    #[error("failed to build the client certificate verifier: {0}")]
    BuildVerifier(String),
    #[error("failed to issue a client certificate: {0}")]
    IssueClientCertificate(&'static str),
    #[error("failed to generate the token signing key: no system randomness")]
    GenerateSigningKey,
}

impl TlsError {
    pub fn category(&self) -> &'static str {
        "tls"
    }
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A certificate authority that can sign serving and client certificates.
#[derive(Debug, Clone)]
pub struct Ca {
    pub pem: String,
    issuer: Arc<Issuer<'static, KeyPair>>,
}

/// A client certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A fresh self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Arc::new(Issuer::new(params, key)),
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn serving(&self, names: &[&str]) -> Result<TlsIdentity, TlsError> {
        let key = KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "kube-sim".into()),
        );
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(TlsIdentity {
            ca_pem: self.pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate for `user` in `groups`, as the API server reads them: the common
    /// name is the user, each organization a group. At most two groups fit (the certificate
    /// library keeps one value per attribute type; the second goes in as a raw O attribute).
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<ClientCert, TlsError> {
        if groups.len() > 2 {
            return Err(TlsError::IssueClientCertificate(
                "at most two groups (organizations) per certificate",
            ));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        if let Some(g) = groups.first() {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        if let Some(g) = groups.get(1) {
            params
                .distinguished_name
                .push(DnType::CustomDnType(vec![2, 5, 4, 10]), *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A CA and a serving certificate it signed.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsIdentity {
    /// A fresh CA and a serving certificate for `names` (DNS names or IP addresses).
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        Ca::new("kube-sim-ca")?.serving(names)
    }

    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.build_server_config(None)
    }

    /// Like [`Self::server_config`], but a client may present a certificate signed by
    /// `client_ca_pem` (not required: token and anonymous clients connect too).
    pub fn server_config_with_client_ca(
        &self,
        client_ca_pem: &str,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.build_server_config(Some(client_ca_pem))
    }

    fn build_server_config(
        &self,
        client_ca_pem: Option<&str>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = parse_certs(&self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::ParsePem(e.to_string()))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in parse_certs(pem)? {
                    roots.add(c)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::BuildVerifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ParsePem(e.to_string()))
}

/// A client configuration trusting `ca_pem`, or trusting anything when `insecure`.
pub fn client_config(ca_pem: &str, insecure: bool) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with_cert(ca_pem, insecure, None)
}

/// Like [`client_config`], presenting `cert` when the server asks for one.
pub fn client_config_with_cert(
    ca_pem: &str,
    insecure: bool,
    cert: Option<&ClientCert>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in parse_certs(ca_pem)? {
            roots.add(c)?;
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
                .map_err(|e| TlsError::ParsePem(e.to_string()))?;
            builder.with_client_auth_cert(parse_certs(&c.cert_pem)?, key)?
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The subject of a DER certificate as the API server's x509 authenticator reads it: the
/// common name and every organization, in order. `None` when the DER is not a certificate.
pub fn subject_of(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (cert, _) = der_element(der, 0x30)?;
    let (mut tbs, _) = der_element(cert, 0x30)?;
    // [0] EXPLICIT version is optional.
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.1;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for tag in [0x02, 0x30, 0x30, 0x30] {
        tbs = der_element(tbs, tag)?.1;
    }
    let (mut name, _) = der_element(tbs, 0x30)?;
    let (mut cn, mut orgs) = (String::new(), Vec::new());
    while !name.is_empty() {
        let (mut set, rest) = der_element(name, 0x31)?;
        name = rest;
        while !set.is_empty() {
            let (atv, rest) = der_element(set, 0x30)?;
            set = rest;
            let (oid, value) = der_element(atv, 0x06)?;
            let (text, _) = der_any(value)?;
            let text = String::from_utf8_lossy(text).into_owned();
            match oid {
                [0x55, 0x04, 0x03] => cn = text,
                [0x55, 0x04, 0x0a] => orgs.push(text),
                _ => {}
            }
        }
    }
    Some((cn, orgs))
}

/// One DER element of tag `tag`: its contents and what follows it.
fn der_element(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    der_any(b)
}

fn der_any(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let first = *b.get(1)?;
    let (len, start) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((b.get(start..end)?, b.get(end..)?))
}

/// The DER of the first certificate in `pem`.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    parse_certs(pem)?
        .into_iter()
        .next()
        .map(|c| c.to_vec())
        .ok_or_else(|| TlsError::ParsePem("no certificate".into()))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|e| TlsError::ParsePem(e.to_string()))
}

// `insecureSkipTLSVerify` on an APIService: the aggregator then trusts any certificate.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
