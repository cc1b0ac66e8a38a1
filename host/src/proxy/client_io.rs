//! What the direct HTTP/1.1 path needs of a client's connection, plain or TLS: a read that
//! never waits (so that a connection between requests holds no buffer), a wait for bytes to
//! come, and ordinary writes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Reads what has arrived into `buf`, or fails with `WouldBlock` when nothing has.
    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize>;

    /// Waits until a read may find bytes (or the end).
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Whether the connection came over TLS.
    fn secure(&self) -> bool;
}

impl ClientIo for TcpStream {
    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }

    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }

    fn secure(&self) -> bool {
        false
    }
}

impl ClientIo for TlsStream<TcpStream> {
    /// One poll of the TLS stream, with a waker that does nothing: the socket's readiness is
    /// what [`ClientIo::readable`] waits on. A poll that finds no whole record's plaintext
    /// has read the socket dry, so rustls holds no plaintext when this says `WouldBlock`.
    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(self), &mut cx, buf) {
            Poll::Ready(read) => read,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Ready at once when rustls holds plaintext already (a request that came with the
    /// handshake's last flight, or more than the last read took), or the peer's close; else
    /// when the socket is.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        let (tcp, tls) = self.get_mut();
        // An error is for the next read to report.
        let held = tls.process_new_packets().map_or(true, |state| {
            state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
        });
        async move { if held { Ok(()) } else { tcp.readable().await } }
    }

    fn secure(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    /// A TLS server stream and its client, over loopback, with a throwaway certificate.
    async fn tls_pair() -> (
        TlsStream<TcpStream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ) {
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).expect("cert");
        let provider = Arc::new(crate::tls::provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connecting = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect("a.test".try_into().expect("a name"), tcp)
                .await
                .expect("client handshake")
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let server = tokio_rustls::TlsAcceptor::from(Arc::new(server))
            .accept(tcp)
            .await
            .expect("server handshake");
        (server, connecting.await.expect("joined"))
    }

    #[tokio::test]
    async fn a_tls_read_that_finds_nothing_would_block_and_readable_wakes_for_the_next_record() {
        let (mut server, mut client) = tls_pair().await;
        let mut buf = bytes::BytesMut::with_capacity(64);
        let nothing = server.try_read_buf(&mut buf);
        assert_eq!(
            nothing.map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        client.flush().await.expect("flush");
        loop {
            tokio::time::timeout(std::time::Duration::from_secs(5), server.readable())
                .await
                .expect("woken")
                .expect("readable");
            match server.try_read_buf(&mut buf) {
                Ok(_) if buf.len() == 16 => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");

        // Plaintext rustls holds, with nothing new on the socket: readable at once (a request
        // that arrived with the handshake is held so).
        client.write_all(b"Host: a\r\n").await.expect("write");
        client.flush().await.expect("flush");
        buf.clear();
        while buf.is_empty() {
            server.readable().await.expect("readable");
            match server.try_read_buf(&mut (&mut buf).limit(1)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), server.readable())
            .await
            .expect("ready with plaintext held")
            .expect("readable");
        while buf.len() < 9 {
            server.try_read_buf(&mut buf).expect("the rest, held");
        }
        assert_eq!(&buf[..], b"Host: a\r\n");
        // The end of the stream reads as none.
        client.shutdown().await.expect("close_notify");
        loop {
            server.readable().await.expect("readable");
            match server.try_read_buf(&mut buf) {
                Ok(0) => break,
                Ok(_) => panic!("nothing more was sent"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(server.secure());
    }
}
