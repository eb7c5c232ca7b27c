//! Which `Host` a request may name. A server bound to a loopback address is meant for this
//! machine, so by default it answers only requests addressed to a loopback name: a page
//! that points a DNS name it controls at 127.0.0.1 (DNS rebinding) sends its own name as
//! `Host` and gets 403, as Ollama and Jupyter do. Bound to other addresses, any host.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

#[derive(Clone, Debug, PartialEq)]
pub enum AllowedHosts {
    Any,
    /// Loopback names and addresses, and these (lower case, no port).
    LoopbackAnd(Vec<String>),
}

impl AllowedHosts {
    /// From `--allowed-hosts`: `*` for any; otherwise loopback names plus the list, where the
    /// list is empty and the server is bound to a non-loopback `bind_host`, any.
    pub fn new(listed: &[String], bind_host: &str) -> Self {
        let listed: Vec<String> = listed
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if listed.iter().any(|h| h == "*") {
            return AllowedHosts::Any;
        }
        if listed.is_empty() && !is_loopback(&bind_host.to_ascii_lowercase()) {
            return AllowedHosts::Any;
        }
        AllowedHosts::LoopbackAnd(listed)
    }

    /// Whether a request with this `Host` header (absent: HTTP/1.0) is answered.
    pub fn allows(&self, host_header: Option<&str>) -> bool {
        let AllowedHosts::LoopbackAnd(listed) = self else {
            return true;
        };
        let Some(host) = host_header else {
            return true;
        };
        let name = host_name(host).to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        is_loopback(name) || listed.iter().any(|h| h == name)
    }
}

/// The name part of a `Host` header: `[::1]:5000` -> `::1`, `localhost:5000` -> `localhost`.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_loopback(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The middleware: 403 for a host that is not allowed.
pub async fn check_host(State(allowed): State<AllowedHosts>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    if allowed.allows(host) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "this server answers only requests addressed to this machine (localhost, 127.0.0.1, \
             [::1]), not to `{}`; its operator can allow more with --allowed-hosts",
            host.unwrap_or_default()
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_binds_answer_only_loopback_names() {
        let allowed = AllowedHosts::new(&[], "127.0.0.1");
        for ok in [
            "127.0.0.1:5000",
            "localhost:5000",
            "LOCALHOST",
            "app.localhost:80",
            "[::1]:5000",
            "127.1.2.3",
            "localhost.",
        ] {
            assert!(allowed.allows(Some(ok)), "{ok}");
        }
        assert!(allowed.allows(None));
        for bad in [
            "evil.example:5000",
            "192.168.1.5:5000",
            "localhost.evil.com",
            "[::2]",
        ] {
            assert!(!allowed.allows(Some(bad)), "{bad}");
        }
        let listed = AllowedHosts::new(&["Studio.lan".into()], "::1");
        assert!(listed.allows(Some("studio.lan:5000")) && listed.allows(Some("localhost")));
        assert!(!listed.allows(Some("other.lan")));
    }

    #[test]
    fn other_binds_and_a_star_answer_any_host() {
        assert_eq!(AllowedHosts::new(&[], "0.0.0.0"), AllowedHosts::Any);
        assert_eq!(
            AllowedHosts::new(&["*".into()], "127.0.0.1"),
            AllowedHosts::Any
        );
        assert_eq!(
            AllowedHosts::new(&[], "localhost"),
            AllowedHosts::LoopbackAnd(vec![])
        );
    }
}
