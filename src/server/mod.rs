//! The HTTP service of the API guide (`../shared/API.md`): axum routes in front of the
//! [`Engine`] (one worker thread that owns the model) and its bounded queue.

mod a1111;
mod body;
mod error;
mod hosts;
mod jobs;
mod listen;
mod metrics;
mod openai;
mod openapi;
mod request;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;

pub use hosts::AllowedHosts;
pub use jobs::JobRetention;
pub use listen::ConnectionLimits;
pub use openapi::openapi;
pub use request::Limits;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::lora::library::LoraLibrary;

/// How to run the service.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (the log says which).
    pub port: u16,
    pub limits: Limits,
    /// Per-request limit, queueing included; `None` for none.
    pub time_limit: Option<Duration>,
    /// Origins allowed by CORS; empty or `*` for any.
    pub cors_origins: Vec<String>,
    /// `Host` names answered besides loopback ones (see [`AllowedHosts::new`]).
    pub allowed_hosts: Vec<String>,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    pub connections: ConnectionLimits,
    pub job_retention: JobRetention,
    /// The folder of LoRA files requests may name; `None`: no LoRAs.
    pub lora_dir: Option<std::path::PathBuf>,
}

/// Binds and serves `engine` (whose worker runs elsewhere, see [`Engine::new`]) until
/// SIGINT or SIGTERM; then stops accepting, cancels what runs and waits (within the
/// shutdown deadline) for open requests to be answered.
pub async fn serve(config: ServerConfig, engine: Arc<Engine>) -> Result<()> {
    let origins = cors_origins(&config.cors_origins)?;
    let allowed_hosts = AllowedHosts::new(&config.allowed_hosts, &config.host);
    raise_open_file_limit();
    let address = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|e| Error::Other(format!("cannot listen on {address}: {e}")))?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("{address}: {e}")))?;
    tracing::info!("listening on http://{local}");
    if let AllowedHosts::LoopbackAnd(listed) = &allowed_hosts {
        tracing::info!(
            "answering requests addressed to loopback names{}",
            if listed.is_empty() {
                String::new()
            } else {
                format!(" and {}", listed.join(", "))
            }
        );
    }

    let state = Arc::new(routes::AppState {
        engine: engine.clone(),
        limits: config.limits.clone(),
        time_limit: config.time_limit,
        body_limit: config.body_limit,
        client_timeout: config.connections.header_timeout,
        jobs: jobs::Jobs::new(config.job_retention),
        a1111: Default::default(),
        http_counts: Default::default(),
        loras: Arc::new(LoraLibrary::new(config.lora_dir.clone())?),
    });
    let app = routes::router(state, &origins, allowed_hosts);
    listen::serve(listener, app, &config.connections, async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests; cancelling the running job");
        engine.shut_down();
    })
    .await;
    Ok(())
}

/// `--cors-origins` as header values; empty for any origin. `*` means any and cannot be
/// combined with a list (a browser would never see both).
fn cors_origins(listed: &[String]) -> Result<Vec<HeaderValue>> {
    let listed: Vec<&str> = listed
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if listed.contains(&"*") {
        if listed.len() > 1 {
            return Err(Error::InvalidArgument(format!(
                "--cors-origins {:?}: `*` allows every origin and cannot be combined with a list",
                listed.join(",")
            )));
        }
        return Ok(Vec::new());
    }
    listed
        .iter()
        .map(|o| {
            HeaderValue::from_str(o).map_err(|_| {
                Error::InvalidArgument(format!("CORS origin {o:?} is not a valid header value"))
            })
        })
        .collect()
}

/// Lifts the soft open-file limit to the hard one (often 1024 against 500k+), so the
/// connection cap, not the file table, is what turns clients away.
fn raise_open_file_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                tracing::debug!("open-file limit raised from {soft} to {}", limit.rlim_max);
            }
        }
    }
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
