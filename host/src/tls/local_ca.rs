//! Harbor's local CA, for `tls = "internal"`: a root kept in the state directory (key readable
//! by Harbor alone), from which each host gets a short-lived certificate on demand. Users trust
//! the root once (`GET /api/v1/tls/ca.pem`), as with Caddy's local CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// How long a host's certificate lasts; it is issued again a third of the way before its end.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the root lasts: users install it once.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ROOT_NAME: &str = "Harbor Local CA";

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    root_der: CertificateDer<'static>,
    /// Where the root and its key are kept, for a proxy that issues from the same root.
    files: Option<(PathBuf, PathBuf)>,
}

/// A certificate issued for one host.
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub pem: Arc<super::files::Pem>,
    pub not_after: SystemTime,
}

impl LocalCa {
    /// The CA kept in `dir` (`ca.pem`, `ca.key`), made there on first use; without a directory,
    /// one that lives as long as the process.
    pub fn open(dir: Option<&Path>) -> Result<Self, String> {
        let Some(dir) = dir else {
            return Self::create(None);
        };
        let (cert, key) = paths(dir);
        match (
            std::fs::read_to_string(&cert),
            std::fs::read_to_string(&key),
        ) {
            (Ok(root_pem), Ok(key_pem)) => {
                let signing =
                    KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
                let issuer = Issuer::from_ca_cert_pem(&root_pem, signing)
                    .map_err(|e| format!("{}: {e}", cert.display()))?;
                let root_der = der_of(&root_pem).map_err(|e| format!("{}: {e}", cert.display()))?;
                Ok(Self {
                    issuer,
                    root_pem,
                    root_der,
                    files: Some((cert, key)),
                })
            }
            _ => Self::create(Some(dir)),
        }
    }

    fn create(dir: Option<&Path>) -> Result<Self, String> {
        let err = |e: rcgen::Error| format!("cannot make the local CA: {e}");
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, ROOT_NAME);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Harbor");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let root = params.self_signed(&key).map_err(err)?;
        let root_pem = root.pem();
        if let Some(dir) = dir {
            let (cert, key_path) = paths(dir);
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&cert, &root_pem).map_err(|e| format!("{}: {e}", cert.display()))?;
            tracing::info!(root = %cert.display(), "made the local CA");
        }
        Ok(Self {
            root_der: root.der().clone(),
            issuer: Issuer::new(params, key),
            root_pem,
            files: dir.map(paths),
        })
    }

    /// The root certificate's file and its key's, when the CA is kept in a directory.
    pub fn files(&self) -> Option<&(PathBuf, PathBuf)> {
        self.files.as_ref()
    }

    /// The root certificate, PEM, for users to trust.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A certificate for `host` (a name, a `*.` wildcard or an address), valid for
    /// [`LEAF_LIFETIME`], with the root after it in the chain.
    pub fn issue(&self, host: &str) -> Result<Issued, String> {
        let err = |e: rcgen::Error| format!("the local CA cannot issue for {host}: {e}");
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        let not_after = now + LEAF_LIFETIME;
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let chain = vec![cert.der().clone(), self.root_der.clone()];
        let pem = super::files::Pem {
            chain: format!("{}{}", cert.pem(), self.root_pem),
            key: key.serialize_pem(),
        };
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(chain, private, &super::provider())
            .map_err(|e| format!("the local CA's certificate for {host} is unusable: {e}"))?;
        Ok(Issued {
            key: Arc::new(certified),
            pem: Arc::new(pem),
            not_after,
        })
    }
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

fn der_of(pem: &str) -> Result<CertificateDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())
}

/// Writes a private key readable by its owner alone, created so from the start.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_kept_and_issues_the_same_chain_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::open(Some(dir.path())).unwrap();
        let again = LocalCa::open(Some(dir.path())).unwrap();
        assert_eq!(ca.root_pem(), again.root_pem());
        let key = std::fs::metadata(dir.path().join("ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        let issued = again.issue("web.localhost").unwrap();
        assert_eq!(issued.key.cert.len(), 2);
        assert_eq!(issued.key.cert[1], ca.root_der);
        assert!(issued.not_after > SystemTime::now() + LEAF_LIFETIME / 2);
    }
}
