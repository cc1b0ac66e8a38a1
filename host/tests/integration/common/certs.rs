//! Certificates for tests: a CA that signs for any names, and Pebble, Let's Encrypt's ACME test
//! server, with pebble-challtestsrv as its DNS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

use super::eventually;

/// A CA for tests, which signs certificates for any names.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub root: CertificateDer<'static>,
    pub root_pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).expect("a root");
        Self {
            root: root.der().clone(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` valid from `from` to `until`, written as `stem.pem` and
    /// `stem.key` in `dir`; returns its DER and the two paths.
    pub fn issue(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        (from, until): (SystemTime, SystemTime),
    ) -> (CertificateDer<'static>, PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("a key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("names");
        params.not_before = from.into();
        params.not_after = until.into();
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        super::write_atomically(&cert_path, &cert.pem());
        super::write_atomically(&key_path, &key.serialize_pem());
        (cert.der().clone(), cert_path, key_path)
    }

    /// The root written to `dir`, for clients (curl) that read it from a file.
    pub fn root_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-root.pem");
        std::fs::write(&path, &self.root_pem).expect("the root");
        path
    }

    pub fn valid(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
    ) -> (CertificateDer<'static>, PathBuf, PathBuf) {
        let now = SystemTime::now();
        self.issue(
            dir,
            stem,
            names,
            (
                now - Duration::from_secs(3600),
                now + Duration::from_secs(86_400),
            ),
        )
    }
}

/// A free port on 127.0.0.1 (bound and let go: Pebble and Harbor's ACME need fixed ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Pebble (the ACME test server) with pebble-challtestsrv as its DNS, validating challenges
/// against Harbor's listeners on `http_port` and `tls_port`. Killed when dropped.
pub struct Pebble {
    pub directory: String,
    /// The root Pebble's own HTTPS is signed with.
    pub root: PathBuf,
    dns_admin: String,
    children: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl Pebble {
    pub fn start(http_port: u16, tls_port: u16) -> Option<Self> {
        let available = ["pebble", "pebble-challtestsrv"]
            .iter()
            .all(|bin| std::process::Command::new(bin).arg("-h").output().is_ok());
        if !available {
            assert!(
                std::env::var("CI").is_err(),
                "pebble and pebble-challtestsrv are required in CI (Debian package pebble)"
            );
            eprintln!("skipped: pebble is not installed (Debian package pebble)");
            return None;
        }
        let dir = tempfile::tempdir().expect("a directory");
        let ca = TestCa::new();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, &ca.root_pem).expect("the root");
        let (_, cert, key) = ca.valid(dir.path(), "pebble", &["127.0.0.1", "localhost"]);
        let (acme, admin, dns, dns_admin) = (free_port(), free_port(), free_port(), free_port());
        let config = dir.path().join("pebble.json");
        std::fs::write(
            &config,
            json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{admin}"),
                "certificate": cert, "privateKey": key,
                "httpPort": http_port, "tlsPort": tls_port,
                "ocspResponderURL": "", "externalAccountBindingRequired": false
            }})
            .to_string(),
        )
        .expect("the config");
        let quiet = || std::process::Stdio::null();
        let challtestsrv = std::process::Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_admin}")])
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .expect("pebble-challtestsrv starts");
        let pebble = std::process::Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // No random waits before validation, no random nonce rejections.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .expect("pebble starts");
        Some(Self {
            directory: format!("https://127.0.0.1:{acme}/dir"),
            root,
            dns_admin: format!("http://127.0.0.1:{dns_admin}"),
            children: vec![challtestsrv, pebble],
            _dir: dir,
        })
    }

    /// Waits until Pebble listens (once it has read its certificate).
    pub async fn ready(&self) {
        let addr = self
            .directory
            .trim_start_matches("https://")
            .trim_end_matches("/dir")
            .to_owned();
        eventually(Duration::from_secs(10), "Pebble listening", || async {
            tokio::net::TcpStream::connect(&addr).await.ok()
        })
        .await;
    }

    /// Settings that point Harbor's ACME at this Pebble, its TLS listener on `tls_port`.
    pub fn settings(
        &self,
        tls_port: u16,
    ) -> impl Fn(&mut harbor::config::Config) + Send + Sync + 'static {
        let (directory, root) = (self.directory.clone(), self.root.clone());
        move |c| {
            c.tls_listen = Some(format!("127.0.0.1:{tls_port}").parse().expect("addr"));
            c.acme_directory = directory.clone();
            c.acme_ca_root = Some(root.clone());
            c.acme_retry = Duration::from_millis(500);
            c.rescan_interval = Some(Duration::from_millis(200));
        }
    }

    /// Settings that make this Pebble the ACME directory Harbor names (to its own client, or
    /// to the driven proxy's), its own HTTPS trusted.
    pub fn directory_settings(
        &self,
    ) -> impl Fn(&mut harbor::config::Config) + Send + Sync + 'static {
        let (directory, root) = (self.directory.clone(), self.root.clone());
        move |c| {
            c.acme_directory = directory.clone();
            c.acme_ca_root = Some(root.clone());
            c.acme_email = Some("ops@example.com".into());
            c.acme_retry = Duration::from_millis(500);
        }
    }

    /// Waits until the certificate served on 127.0.0.1:`port` for `name` is one Pebble issued.
    pub async fn until_issued(&self, port: u16, name: &str) {
        eventually(
            Duration::from_secs(30),
            "a certificate from Pebble",
            || async {
                let issuer = served_certificate(port, name, "-issuer").await;
                issuer.to_lowercase().contains("pebble").then_some(())
            },
        )
        .await;
    }

    /// Makes `host` resolve to an address where Harbor does not listen, so that its
    /// challenges fail.
    pub async fn misdirect(&self, host: &str) {
        let resp = reqwest::Client::new()
            .post(format!("{}/add-a", self.dns_admin))
            .json(&json!({"host": host, "addresses": ["127.0.0.2"]}))
            .send()
            .await
            .expect("challtestsrv answers");
        assert!(resp.status().is_success());
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TLS server on 127.0.0.1 with `cert`/`key`, which says `name` to every client once the
/// handshake is done: what a passthrough client reaches proves who terminated its TLS.
pub async fn tls_upstream(name: &'static str, cert: &Path, key: &Path) -> std::net::SocketAddr {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("the chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(key).expect("the key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("a config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(name.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A TLS connection to `addr` asking for `name`, trusting `roots`; `None` if the handshake
/// fails or takes over five seconds.
async fn tls_to(
    addr: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let server = ServerName::try_from(name.to_owned()).ok()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        connector(roots).connect(server, tcp),
    )
    .await
    .ok()?
    .ok()
}

/// Everything the other end of `tls` says until it closes, within five seconds.
async fn read_all(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut said = String::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut said))
        .await
        .ok()?
        .ok()?;
    Some(said)
}

/// Connects to `addr` over TLS asking for `name` (none for an IP address), trusting `roots`,
/// and reads what the other end says until it closes; `None` if the handshake fails.
pub async fn tls_says(
    addr: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> Option<String> {
    let mut tls = tls_to(addr, roots, name).await?;
    read_all(&mut tls).await
}

/// A TLS client trusting `roots`, offering h2 and HTTP/1.1.
pub fn connector(roots: &[CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("a root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Over TLS to `addr` asking for `name`, trusting `roots`: an HTTP/1.1 request for `/` inside,
/// and the whole answer; `None` if the handshake or the exchange fails. For tcp services whose
/// TLS is terminated in front of an HTTP test upstream.
pub async fn http_inside_tls(
    addr: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> Option<String> {
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_to(addr, roots, name).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    read_all(&mut tls).await
}

/// A field of the certificate served on 127.0.0.1:`port` for `name`, as `openssl x509` prints
/// it (`-issuer`, `-serial`); empty when none is served.
pub async fn served_certificate(port: u16, name: &str, field: &str) -> String {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {name} </dev/null 2>/dev/null | openssl x509 -noout {field}"
        ))
        .output()
        .await
        .expect("openssl runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A route file's text: `head` (its own lines, each ending in a newline), then `upstream` and
/// the certificate files `tls` names.
pub fn route_with_files(
    head: &str,
    upstream: std::net::SocketAddr,
    cert: &Path,
    key: &Path,
) -> String {
    format!(
        "{head}upstreams = [\"{upstream}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    )
}

/// Routes a tcp service `db.test`, whose TLS is terminated in front of an HTTP upstream with a
/// certificate `ca` issues, and waits until a client trusting `ca` reaches that upstream through
/// it; `by` names who terminates, for the failure message.
pub async fn tcp_tls_is_terminated(h: &super::TestHarbor, ca: &TestCa, dir: &Path, by: &str) {
    let (_, cert, key) = ca.valid(dir, "db", &["db.test"]);
    let db = super::proxies::Upstream::start("db").await;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let head = format!("protocol = \"tcp\"\nlisten = \"{listen}\"\nhost = \"db.test\"\n");
    h.write_route("db.route", &route_with_files(&head, db.addr, &cert, &key));
    let roots = [ca.root.clone()];
    eventually(
        Duration::from_secs(10),
        &format!("db.test terminated by {by}"),
        || async {
            let answer = http_inside_tls(listen, &roots, "db.test").await?;
            answer.ends_with("db").then_some(())
        },
    )
    .await;
}

/// `curl` to `https://host:port/path` on 127.0.0.1, trusting `ca` (none: any certificate): the
/// status, the head and the body, or curl's complaint.
pub async fn curl_https(
    port: u16,
    ca: Option<&Path>,
    url_host: &str,
    path: &str,
) -> Result<(u16, String, String), String> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-D", "-", "-o", "-"])
        .arg("--resolve")
        .arg(format!("{url_host}:{port}:127.0.0.1"));
    match ca {
        Some(ca) => cmd.arg("--cacert").arg(ca),
        None => cmd.arg("-k"),
    };
    let out = cmd
        .arg(format!("https://{url_host}:{port}{path}"))
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, head.to_owned(), body.to_owned()))
}
