//! TLS passthrough: the name a client's ClientHello asks for (SNI), read without decrypting
//! anything, so that services sharing a listen address each get their own connections. The
//! hello is parsed by rustls, not by hand: it is the first thing an attacker controls.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The most a ClientHello may take, in bytes: one TLS record of 16 KiB and its header, with
/// room for a hello split over two records. Post-quantum key shares make hellos of about
/// 1.5 KiB; nothing legitimate comes near this.
const MAX_HELLO: usize = 20 * 1024;

/// Why a connection was not routed by its hello.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a TLS ClientHello, or one over [`MAX_HELLO`].
    NotTls(String),
    /// The hello did not come within the time given.
    Slow,
    /// The client closed before its hello was complete.
    Closed,
}

/// Reads `client`'s ClientHello within `within`, and returns the bytes read (for the
/// upstream, which must see them first) and the name asked for, if any.
pub async fn read_hello(
    client: &mut TcpStream,
    within: Duration,
) -> Result<(Vec<u8>, Option<String>), Refused> {
    tokio::time::timeout(within, hello(client))
        .await
        .map_err(|_| Refused::Slow)?
}

async fn hello(client: &mut TcpStream) -> Result<(Vec<u8>, Option<String>), Refused> {
    let mut read = Vec::with_capacity(2048);
    let mut acceptor = rustls::server::Acceptor::default();
    let mut chunk = [0u8; 4096];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| Refused::NotTls(e.to_string()))?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        if read.len() + n > MAX_HELLO {
            return Err(Refused::NotTls(format!(
                "no complete ClientHello in its first {MAX_HELLO} bytes"
            )));
        }
        read.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            match acceptor.read_tls(&mut fresh) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(Refused::NotTls(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let name = accepted.client_hello().server_name().map(str::to_owned);
                return Ok((read, name));
            }
            Ok(None) => {}
            Err((e, _)) => return Err(Refused::NotTls(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A real ClientHello for `name`, as rustls's client sends it.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            crate::tls::provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            name.to_owned().try_into().expect("a name"),
        )
        .expect("a connection");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("the hello");
        out
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn the_name_is_read_from_a_hello_sent_in_pieces_and_its_bytes_kept() {
        let hello = client_hello("db.example.com");
        let (mut client, mut server) = pair().await;
        let sent = hello.clone();
        tokio::spawn(async move {
            for piece in sent.chunks(7) {
                client.write_all(piece).await.expect("write");
                client.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Held open until the reader is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (read, name) = read_hello(&mut server, Duration::from_secs(5))
            .await
            .expect("a hello");
        assert_eq!(name.as_deref(), Some("db.example.com"));
        assert_eq!(read, hello, "every byte read goes on to the upstream");
    }

    #[tokio::test]
    async fn what_is_not_a_hello_is_refused_and_a_silent_client_times_out() {
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert!(matches!(
            read_hello(&mut server, Duration::from_secs(5)).await,
            Err(Refused::NotTls(_))
        ));

        let (_quiet, mut server) = pair().await;
        assert_eq!(
            read_hello(&mut server, Duration::from_millis(50)).await,
            Err(Refused::Slow)
        );

        // A record header promising more than a hello may take.
        let (mut client, mut server) = pair().await;
        let mut huge = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        huge.resize(MAX_HELLO + 10, 0);
        tokio::spawn(async move {
            let _ = client.write_all(&huge).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert!(matches!(
            read_hello(&mut server, Duration::from_secs(5)).await,
            Err(Refused::NotTls(_))
        ));
    }
}
