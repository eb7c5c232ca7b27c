//! The accept loop: what a client may hold open and for how long. Every connection has a
//! slot (a capped number, so idle sockets cannot use up the process's files), a deadline
//! for its request head (which also ends idle keep-alive connections), and shutdown ends
//! within a deadline whatever the clients do.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// What one connection may take.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// From the first byte of a request (or the end of the previous response on a
    /// keep-alive connection) to the end of its head.
    pub header_timeout: Duration,
    /// How long shutdown waits for open connections before closing them.
    pub shutdown_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            // Far above what one engine serves (one job running, a few waiting, page
            // loads), far below the 1024 files a default soft limit allows.
            max_connections: 256,
            // nginx's client_header_timeout is 60 s and Go's ReadHeaderTimeout is commonly
            // set to 10-30 s; a browser or SDK sends its head in milliseconds.
            header_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open connections
/// finish their current response for at most `limits.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of files or memory: wait for connections to close rather than
                    // spinning on the error.
                    tracing::warn!("accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    let open = connections.count();
    if open > 0 {
        tracing::info!("waiting for {open} open connections to finish");
    }
    if tokio::time::timeout(limits.shutdown_timeout, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "closing the connections still open after {} s",
            limits.shutdown_timeout.as_secs()
        );
    }
}

/// Answers a connection over the cap with a JSON 503 and closes it.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = format!(
        "{{\"error\":\"this server has {cap} connections open, its limit; try again shortly\"}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // A client that does not read gets dropped after a second.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
}
