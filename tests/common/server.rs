//! The real `sd-wgpu serve` binary on a loopback port, and a small HTTP/1.1 client that can
//! also send what a well-behaved client would not (bad bodies, early disconnects).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request that keeps the engine busy for tens of seconds on the sd1 fixture (0.3 s a
/// step on 2 cores); tests cancel it long before it ends.
pub const LONG_JOB: &str =
    r#"{"prompt": "a long job", "width": 64, "height": 64, "num_inference_steps": 150, "seed": 1}"#;
pub const SMALL_JOB: &str =
    r#"{"prompt": "a small job", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 2}"#;

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn busy(server: &Server) -> bool {
    server.get("/health").json()["busy"] == true
}

/// Sends `body` to POST /generate on a raw connection it returns, without reading the answer.
pub fn post_on_connection(server: &Server, body: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST /generate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    stream
}

/// POSTs `body` as JSON to `path` from another thread; join it for the response.
pub fn post_json_in_background(
    server: &Server,
    path: &'static str,
    body: &'static str,
) -> std::thread::JoinHandle<Response> {
    let addr = server.addr;
    std::thread::spawn(move || {
        request(
            addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    })
}

/// Starts a long job on a raw connection and waits until the engine runs it.
pub fn start_long_job(server: &Server) -> TcpStream {
    let stream = post_on_connection(server, LONG_JOB);
    wait_until("the long job runs", Duration::from_secs(30), || {
        busy(server)
    });
    stream
}

/// A running server; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// Everything the server logged so far.
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `sd-wgpu serve --model <model> --port 0 --backend cpu <extra...>` with
    /// `HF_HUB_OFFLINE=1` and waits until it listens (not until the model is loaded).
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        Server::start_on("cpu", model, extra)
    }

    /// [`Server::start`] on `backend` (`cpu` or `gpu`).
    pub fn start_on(backend: &str, model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sd-wgpu"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0", "--backend", backend])
            .args(extra)
            .env("RUST_LOG", "info")
            // The convolutions' built-in choices unless a test asks otherwise: the fixtures'
            // layers are too small to be measured, and no test depends on the user's cache.
            .env("SD_CPU_TUNING", "table")
            // Tests run side by side on few cores: one compute thread per server.
            .env("RAYON_NUM_THREADS", "1")
            // A Hub id that is not found locally is never fetched: no test uses the network.
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sd-wgpu serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("a socket address in the log"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the server did not start listening; log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    /// Polls /health until the model is loaded.
    pub fn wait_ready(&self) -> &Self {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get("/health");
            if r.status == 200 && r.json()["model_loaded"] == true {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "model not loaded after 60 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until the server's log contains `line`: what the server wrote is
    /// read from its stderr by another thread, so a line written just now may not be
    /// here yet (a check right after /health said the engine was free failed that way
    /// on CI's 2 cores).
    pub fn wait_for_log(&self, line: &str) {
        wait_until(
            &format!("the log says {line:?}"),
            Duration::from_secs(10),
            || self.log().contains(line),
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &str) -> Response {
        request(
            self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The server's resident memory in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The `error` of a JSON error body, checking the content type.
    pub fn error(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no `error` string in {}", self.text()))
            .to_string()
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    send_raw(addr, &raw)
}

/// Writes raw bytes and parses the response (plain or chunked body).
pub fn send_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connecting to the server");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    // The server may answer (413) before reading everything; a write error is fine then.
    let _ = stream.write_all(raw);
    let mut data = Vec::new();
    let _ = stream.read_to_end(&mut data);
    parse_response(&data)
}

fn parse_response(data: &[u8]) -> Response {
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(data)
            )
        });
    let head = String::from_utf8_lossy(&data[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = data[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}
