//! Certificates from files (`tls = { cert = "...", key = "..." }`): read, checked (the key is
//! the certificate's, the certificate is within its validity), and read again when either file
//! changes. A pair that fails its check keeps the last good one serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A certificate and key as read, with what tells whether the files changed since.
#[derive(Clone)]
pub struct Pair {
    pub key: Arc<CertifiedKey>,
    /// The same certificate as text, for a proxy that is handed its certificates (Envoy).
    pub pem: Arc<Pem>,
    pub not_after: SystemTime,
    stamp: Stamp,
}

/// A certificate chain (leaf first) and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    pub chain: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

/// The files' sizes and modification times.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Stamp(Vec<(u64, Option<SystemTime>)>);

pub fn stamp(paths: &[&Path]) -> Stamp {
    Stamp(
        paths
            .iter()
            .map(|p| std::fs::metadata(p).map_or((0, None), |m| (m.len(), m.modified().ok())))
            .collect(),
    )
}

impl Pair {
    pub fn served(&self) -> super::Served {
        (self.key.clone(), self.pem.clone())
    }

    /// Whether the files are as they were when this pair was read.
    pub fn current(&self, cert: &Path, key: &Path) -> bool {
        stamp(&[cert, key]) == self.stamp
    }
}

/// Reads and checks the pair; the error says which file and what is wrong with it.
pub fn load(cert: &Path, key: &Path) -> Result<Pair, String> {
    let stamp = stamp(&[cert, key]);
    let chain_text = std::fs::read_to_string(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?;
    let key_text = std::fs::read_to_string(key)
        .map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate: {e}", cert.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{} holds no certificate", cert.display()));
    };
    let not_after = validity(leaf, cert)?;
    let private = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
        .map_err(|e| format!("{} is not a PEM private key: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, &super::provider()).map_err(|e| {
        format!(
            "the key {} does not go with the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Pair {
        key: Arc::new(certified),
        pem: Arc::new(Pem {
            chain: chain_text,
            key: key_text,
        }),
        not_after,
        stamp,
    })
}

/// The end of the certificate's validity; an error if it has ended or not yet begun.
fn validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<SystemTime, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{} is not a valid certificate: {e}", path.display()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    };
    let validity = parsed.validity();
    let (from, until) = (at(validity.not_before), at(validity.not_after));
    let now = SystemTime::now();
    if until <= now {
        return Err(format!(
            "the certificate {} expired at {}",
            path.display(),
            crate::model::timestamp(until)
        ));
    }
    if from > now {
        return Err(format!(
            "the certificate {} is not valid before {}",
            path.display(),
            crate::model::timestamp(from)
        ));
    }
    Ok(until)
}

/// The files a route names, as one key.
pub type Files = (PathBuf, PathBuf);
