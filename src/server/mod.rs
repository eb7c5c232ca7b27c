//! The HTTP service of the API guide (`../shared/API.md`): axum routes in front of one
//! engine (one worker thread that owns the model) and its bounded queue.

mod engine;
mod error;
mod request;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;

pub use engine::{Engine, EngineWorker};
pub use request::Limits;

use crate::error::{Error, Result};

/// How to run the service.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (the log says which).
    pub port: u16,
    pub limits: Limits,
    /// Per-request limit, queueing included; `None` for none.
    pub time_limit: Option<Duration>,
    /// Origins allowed by CORS; empty for any.
    pub cors_origins: Vec<String>,
    /// Largest request body, in bytes.
    pub body_limit: usize,
}

/// Binds and serves `engine` (whose worker runs elsewhere, see [`engine::Engine::new`])
/// until SIGINT or SIGTERM; then stops accepting, cancels what runs and waits for open
/// requests to be answered.
pub async fn serve(config: ServerConfig, engine: Arc<engine::Engine>) -> Result<()> {
    let origins = config
        .cors_origins
        .iter()
        .filter(|o| o.as_str() != "*")
        .map(|o| {
            HeaderValue::from_str(o.trim()).map_err(|_| {
                Error::InvalidArgument(format!("CORS origin {o:?} is not a valid header value"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let address = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|e| Error::Other(format!("cannot listen on {address}: {e}")))?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("{address}: {e}")))?;
    tracing::info!("listening on http://{local}");

    let state = Arc::new(routes::AppState {
        engine: engine.clone(),
        limits: config.limits.clone(),
        time_limit: config.time_limit,
        body_limit: config.body_limit,
    });
    let app = routes::router(state, &origins);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new requests; cancelling the running job");
            engine.shut_down();
        })
        .await
        .map_err(|e| Error::Other(format!("server error: {e}")))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
