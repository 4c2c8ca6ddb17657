//! A small HTTP/1.1 server for the few plain-HTTP endpoints beside gRPC (the
//! metrics endpoint, a carrier's e-mail tracking links): one task per
//! connection, every connection dropped at `cancel`.

use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A request as the handler sees it.
pub type Request = hyper::Request<hyper::body::Incoming>;
/// What a handler answers: a whole body.
pub type Response = hyper::Response<Full<Bytes>>;

/// A response with `status`, a content type and a body.
pub fn response(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response {
    let mut response = hyper::Response::new(Full::new(body.into()));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// Serves `handle` on `listener` until `cancel`.
pub async fn serve<H, F>(listener: TcpListener, cancel: CancellationToken, handle: H)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    loop {
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "HTTP listener failed to accept");
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request| {
                let answer = handle(request);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = cancel.cancelled() => {}
            }
        });
    }
}
