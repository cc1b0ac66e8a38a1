//! The HTTPS side of the embedded proxy: the TLS listener (rustls: TLS 1.2 and 1.3, the
//! certificate by SNI, ALPN offering `h2` and `http/1.1`), whose connections go to the full
//! HTTP stack with the same framing policy, limits and timeouts as plain ones; and the redirect
//! of plain HTTP to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::routing::ServiceRoute;
use crate::tls::Certificates;

use super::Shared;
use super::lanes::Lanes;
use super::policy::Answer;

/// What the proxy knows of its TLS listener, and the certificates its tcp services terminate
/// TLS with.
pub struct TlsFront {
    pub certificates: Arc<Certificates>,
    /// The port HTTPS is served on, for redirects; none where another proxy serves HTTP
    /// (Caddy), and Harbor's certificates serve only its tcp services.
    pub port: Option<u16>,
}

/// The server configuration every TLS connection shares.
pub fn server_config(certificates: Arc<Certificates>) -> anyhow::Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    // Last: chosen only by an ACME CA validating a TLS-ALPN-01 challenge, which offers nothing
    // else; such a connection ends after its handshake.
    config.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        crate::tls::acme::ACME_TLS_ALPN.to_vec(),
    ];
    Ok(config)
}

/// The acceptor of a tcp service whose TLS Harbor terminates: its own certificate (see
/// [`crate::tls::ServiceCertificate`]), no ALPN (the bytes inside are the service's own
/// protocol); none when the configuration cannot be made, which is logged.
pub fn tcp_acceptor(front: &TlsFront, route: &ServiceRoute) -> Option<TlsAcceptor> {
    let resolver = Arc::new(crate::tls::ServiceCertificate {
        certificates: front.certificates.clone(),
        hosts: route.certified_hosts().to_vec(),
    });
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .inspect_err(|e| tracing::error!(service = %route.name, error = %e, "no TLS configuration"))
        .ok()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Some(TlsAcceptor::from(Arc::new(config)))
}

/// Where a plain-HTTP request for `route` goes instead: the same host and target on the HTTPS
/// listener, when the route is served over TLS, has a certificate for the host, and redirects.
/// ACME's HTTP-01 challenges stay on plain HTTP.
pub fn redirect(shared: &Shared, route: &ServiceRoute, host: &str, target: &str) -> Option<Answer> {
    let front = shared.tls.as_ref()?;
    let port = front.port?;
    if !route.tls.serves()
        || !route.tls.redirects()
        || target.starts_with(crate::tls::acme::CHALLENGE_PREFIX)
    {
        return None;
    }
    let bare = crate::routing::strip_port(host);
    if !plain_name(bare) || !front.certificates.covers(bare) {
        return None;
    }
    let authority = match (port, bare.contains(':')) {
        (443, false) => bare.to_owned(),
        (443, true) => format!("[{bare}]"),
        (port, false) => format!("{bare}:{port}"),
        (port, true) => format!("[{bare}]:{port}"),
    };
    Some(Answer::redirect(format!("https://{authority}{target}")))
}

/// Whether a client's host is a plain DNS name or address, fit to be sent back in a Location.
/// The framing policy lets a `Host` through with any RFC 9110 reg-name character, and a
/// wildcard route matches any first label: a `%` or `;` there would make a Location that
/// browsers read differently.
fn plain_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}

/// The answer to an ACME HTTP-01 challenge for an order Harbor has open, whatever the host.
pub fn challenge(shared: &Shared, path: &str) -> Option<Answer> {
    let token = path.strip_prefix(crate::tls::acme::CHALLENGE_PREFIX)?;
    let front = shared.tls.as_ref()?;
    front
        .certificates
        .acme_challenge(token)
        .map(Answer::acme_challenge)
}

/// Accepts TLS connections until `stop`, each handshaken and served on its own task in one of
/// the lanes. A handshake gets the head timeout: a client that opens a connection and says
/// nothing holds it no longer than one that sends half a request head.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    lanes: Option<Arc<Lanes>>,
    acceptor: TlsAcceptor,
    stop: CancellationToken,
) {
    let builder = Arc::new(super::http::builder());
    let serve = move |shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr| {
        let (builder, acceptor) = (builder.clone(), acceptor.clone());
        async move {
            let timeout = shared.settings.header_timeout;
            let Some(tls) = handshake(&shared, &acceptor, stream, peer, timeout).await else {
                return;
            };
            match tls.get_ref().1.alpn_protocol() {
                // A CA validating a TLS-ALPN-01 challenge wants only the handshake.
                Some(crate::tls::acme::ACME_TLS_ALPN) => {}
                Some(b"h2") => {
                    super::http::serve_full(shared, tls, Bytes::new(), peer, builder, true).await;
                }
                // HTTP/1.1 takes the direct path, as on the plain listener; what it does not
                // take goes on to the full stack with the bytes already read.
                _ if shared.settings.direct_http1 => {
                    let full = |tls, read| {
                        super::http::serve_full(shared.clone(), tls, read, peer, builder, true)
                    };
                    super::h1::serve(shared.clone(), tls, peer, full).await;
                }
                _ => {
                    super::http::serve_full(shared, tls, Bytes::new(), peer, builder, true).await;
                }
            }
        }
    };
    super::http::accept(shared, listener, lanes, stop, "HTTPS", serve).await;
}

pub(super) async fn handshake(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            shared
                .metrics
                .tls_handshakes
                .with_label_values(&["ok"])
                .inc();
            Some(tls)
        }
        Ok(Err(e)) => {
            shared
                .metrics
                .tls_handshakes
                .with_label_values(&["failed"])
                .inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            shared
                .metrics
                .tls_handshakes
                .with_label_values(&["timeout"])
                .inc();
            tracing::debug!(%peer, "TLS handshake not finished in time");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_sent_back_in_a_location() {
        for good in [
            "a.test",
            "x-1.w.test",
            "127.0.0.1",
            "::1",
            "under_score.lan",
        ] {
            assert!(plain_name(good), "{good}");
        }
        for bad in [
            "",
            "evil%2Ecom.w.test",
            "a;b.w.test",
            "a!b.w.test",
            "x~y.w.test",
            "a*b.test",
        ] {
            assert!(!plain_name(bad), "{bad}");
        }
    }
}
