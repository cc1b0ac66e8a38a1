//! `harbor echo`: demo backends. An HTTP request is answered with which backend served it (a
//! `GET` gets a summary of the request; a request with a body gets its body back, streamed);
//! any other TCP traffic is echoed byte for byte. One process can be several backends.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::rewind::Rewind;

const METHODS: [&[u8]; 10] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * ",
];

/// Binds every address first, so that a taken port fails before anything runs.
pub async fn bind(addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("echo: cannot listen on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "echo backend listening");
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves one listener until `stop`.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    let Ok(me) = listener.local_addr() else {
        return;
    };
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(addr = %me, error = %e, "echo cannot accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection(stream, me) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn connection(mut stream: TcpStream, me: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut first = vec![0u8; 16 * 1024];
    let n = match stream.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    first.truncate(n);
    if METHODS.iter().any(|m| first.starts_with(m)) {
        let io = TokioIo::new(Rewind::new(Bytes::from(first), stream));
        let service =
            hyper::service::service_fn(
                move |req| async move { Ok::<_, Infallible>(answer(req, me)) },
            );
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        if stream.write_all(&first).await.is_err() {
            return;
        }
        let (mut read, mut write) = stream.split();
        if tokio::io::copy(&mut read, &mut write).await.is_ok() {
            let _ = write.shutdown().await;
        }
    }
}

fn answer(req: Request<Incoming>, me: SocketAddr) -> Response<UnsyncBoxBody<Bytes, hyper::Error>> {
    let with_body = !matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
    );
    let body = if with_body {
        req.into_body().boxed_unsync()
    } else {
        let mut text = format!(
            "served by {me}\n{} {} {:?}\n",
            req.method(),
            req.uri(),
            req.version()
        );
        for (name, value) in req.headers() {
            text.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        http_body_util::Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync()
    };
    let mut response = Response::new(body);
    if let Ok(value) = me.to_string().parse() {
        response.headers_mut().insert("x-served-by", value);
    }
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
