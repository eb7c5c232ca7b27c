//! The API guide's examples, run the way its readers run them: the real `sd-wgpu serve`
//! binary on a loopback port, and real clients — the `curl` command line, the Python
//! example with `requests` and Pillow, the JavaScript example in headless Chromium on a
//! page from another origin, and the page at `GET /` driven through Chromium's DevTools
//! protocol.
//!
//! The examples are the guide's code blocks verbatim (tests/fixtures/api_guide/), with only
//! `http://localhost:5000` replaced by the test server's address. They ask for the guide's
//! defaults (512x512, 25-30 steps with guidance), so the server runs the `fast512` fixture: a
//! tiny model with the real VAE factor of 8 and no full-resolution attention.
//!
//! What they need beyond Rust: `curl`, `chromium` (Debian packages of those names) and, for
//! the `python3` on PATH, `requests` and `pillow`. `.ci/run` installs them; a test whose
//! program is missing fails and names the package to install.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use common::programs::{require, run, tail};
use common::server::Server;
use common::without_proxies;

const CURL_EXAMPLE: &str = include_str!("fixtures/api_guide/curl_example.sh");
const PYTHON_EXAMPLE: &str = include_str!("fixtures/api_guide/python_example.py");
const JAVASCRIPT_EXAMPLE: &str = include_str!("fixtures/api_guide/javascript_example.js");

/// Where the examples send their requests.
const GUIDE_BASE_URL: &str = "http://localhost:5000";

/// The model every test serves: the guide's 512x512 default is cheap on it.
const MODEL: &str = "fast512";

/// How long one generation may take, queueing and client start-up included.
const GENERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The tests run one at a time: each starts its own server (so its log holds only its own
/// requests), and a generation uses every core.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn start_server() -> Server {
    let model = common::model_dir(MODEL);
    assert!(
        model.join("model_index.json").is_file(),
        "the fixture model {} is missing (tools/fixtures/make_fixtures.py makes it)",
        model.display()
    );
    let server = Server::start(&model, &[]);
    server.wait_ready();
    server
}

/// An example with its base URL pointed at `server`. Checks first that the example is still
/// verbatim in the guide when the guide is there to compare with (`../shared/API.md`).
fn example_for(example: &str, server: &Server) -> String {
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/API.md");
    match std::fs::read_to_string(&guide) {
        Ok(text) => assert!(
            text.contains(example),
            "this example is no longer verbatim in {}; copy the guide's code block into \
             tests/fixtures/api_guide/:\n{example}",
            guide.display()
        ),
        Err(_) => eprintln!(
            "note: {} not found; the examples were not compared with it",
            guide.display()
        ),
    }
    assert_eq!(example.matches(GUIDE_BASE_URL).count(), 1, "{example}");
    example.replace(GUIDE_BASE_URL, &server.url(""))
}

/// Decodes a PNG, checking that it is one and that it is an RGB image of `width`x`height`
/// that is not a single flat color.
fn check_png(what: &str, png: &[u8], width: u32, height: u32) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{what}: not a PNG ({} bytes)",
        png.len()
    );
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{what}: the PNG does not decode: {e}"));
    assert_eq!(
        (image.width(), image.height()),
        (width, height),
        "{what}: size"
    );
    assert_eq!(image.color(), image::ColorType::Rgb8, "{what}: color type");
    let pixels = image.to_rgb8();
    let first = pixels.get_pixel(0, 0);
    assert!(
        pixels.pixels().any(|p| p != first),
        "{what}: every pixel is {first:?}"
    );
}

fn decode_base64(what: &str, text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("{what}: not base64: {e}"))
}

/// The PNG in a `data:image/png;base64,` URL.
fn png_data_url(what: &str, url: &Value) -> Vec<u8> {
    let url = url.as_str().unwrap_or_default();
    let data = url
        .strip_prefix("data:image/png;base64,")
        .unwrap_or_else(|| panic!("{what} is not a PNG data: URL: {}", tail(url, 100)));
    decode_base64(what, data)
}

/// The number of `POST /generate` requests the server answered with 200.
fn generations_logged(server: &Server) -> usize {
    server.log().matches("POST /generate 200").count()
}

/// Jobs the page started.
fn jobs_logged(server: &Server) -> usize {
    server.log().matches("POST /jobs 202").count()
}

/// The guide's curl example, run by `bash` with the real `curl`.
#[test]
fn guide_curl_example() {
    let _serial = one_at_a_time();
    require("curl", "apt-get install curl");
    require("bash", "apt-get install bash");
    let server = start_server();
    let script = example_for(CURL_EXAMPLE, &server);
    let out = run(
        without_proxies(Command::new("bash").arg("-c").arg(&script)),
        GENERATION_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "curl failed ({}); stderr:\n{stderr}",
        out.status
    );
    let response: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "curl's output is not JSON ({e}): {}\nserver log:\n{}",
            tail(&String::from_utf8_lossy(&out.stdout), 2000),
            server.log()
        )
    });
    let image = response["image"]
        .as_str()
        .unwrap_or_else(|| panic!("no `image` string in {}", tail(&response.to_string(), 2000)));
    check_png(
        "the curl example's image",
        &decode_base64("image", image),
        512,
        512,
    );
    // The example's parameters reached the engine; width and height are the guide's defaults.
    assert_eq!(
        response["num_inference_steps"],
        30,
        "{}",
        tail(&response.to_string(), 400)
    );
    assert_eq!(response["guidance_scale"], 8.0);
    assert_eq!(
        (response["width"].as_u64(), response["height"].as_u64()),
        (Some(512), Some(512))
    );
    assert_eq!(
        generations_logged(&server),
        1,
        "server log:\n{}",
        server.log()
    );
}

/// The guide's Python example, run by the `python3` on PATH in an empty folder.
#[test]
fn guide_python_example() {
    let _serial = one_at_a_time();
    require("python3", "apt-get install python3");
    let check = run(
        Command::new("python3").args(["-c", "import requests, PIL, sys; print(sys.executable)"]),
        Duration::from_secs(60),
    );
    assert!(
        check.status.success(),
        "the Python example needs requests and Pillow for the python3 on PATH: \
         python3 -m pip install requests pillow\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("example.py"),
        example_for(PYTHON_EXAMPLE, &server),
    )
    .unwrap();
    let out = run(
        without_proxies(
            Command::new("python3")
                .arg("example.py")
                .current_dir(dir.path()),
        ),
        GENERATION_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "the Python example failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = dir.path().join("generated_image.png");
    // The example saves nothing (and says nothing) unless the status is 200.
    let png = std::fs::read(&saved).unwrap_or_else(|e| {
        panic!(
            "the Python example did not write {} ({e}); server log:\n{}",
            saved.display(),
            server.log()
        )
    });
    check_png("generated_image.png", &png, 512, 512);
    assert_eq!(
        generations_logged(&server),
        1,
        "server log:\n{}",
        server.log()
    );
}

/// Serves one HTML page at `/` from its own loopback port (another origin than the API
/// server's), recording the request lines it gets; stops when dropped.
struct PageServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl PageServer {
    fn start(html: String) -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (requests.clone(), stop.clone());
        let html = Arc::new(html);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                // A thread per connection: the browser may open a connection it never uses.
                let (html, log) = (html.clone(), log.clone());
                std::thread::spawn(move || serve_page(stream, &html, &log));
            }
        });
        PageServer {
            addr,
            requests,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Answers one request on `stream`: the page at `/`, 404 elsewhere.
fn serve_page(mut stream: TcpStream, html: &str, log: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    // The rest of the head; these requests have no body.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let request_line = request_line.trim().to_string();
    let (status, body) = if request_line.starts_with("GET / ") {
        ("200 OK", html)
    } else {
        ("404 Not Found", "not found")
    };
    log.lock().unwrap().push(request_line);
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// The flags every Chromium here runs with: headless, no sandbox (CI runs as root), no GPU,
/// nothing from the network but what the page asks for, a fresh profile.
fn chromium_command(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--password-store=basic",
        "--window-size=1280,1024",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    without_proxies(&mut command);
    command
}

const CHROMIUM_INSTALL: &str = "apt-get install chromium";

/// One network request from Chromium's net log: method, URL, and the headers sent and
/// received (names lower-cased; the status line is `status`).
#[derive(Debug, Default)]
struct NetRequest {
    method: String,
    url: String,
    sent: Vec<(String, String)>,
    status: String,
    received: Vec<(String, String)>,
}

impl NetRequest {
    fn sent(&self, name: &str) -> Option<&str> {
        self.sent
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn received(&self, name: &str) -> Option<&str> {
        self.received
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether a response lets `origin` read it.
fn allows(response: &NetRequest, origin: &str) -> bool {
    matches!(response.received("access-control-allow-origin"), Some(o) if o == "*" || o == origin)
}

/// The HTTP requests of a Chromium net log (`--log-net-log`), in order.
fn net_requests(path: &Path) -> Vec<NetRequest> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let log: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    let types: HashMap<u64, &str> = log["constants"]["logEventTypes"]
        .as_object()
        .expect("logEventTypes in the net log")
        .iter()
        .filter_map(|(name, id)| Some((id.as_u64()?, name.as_str())))
        .collect();
    let headers = |params: &Value| -> Vec<(String, String)> {
        params["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str()?.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect()
    };
    let mut order = Vec::new();
    let mut requests: HashMap<u64, NetRequest> = HashMap::new();
    for event in log["events"].as_array().expect("events in the net log") {
        let (Some(kind), Some(source)) = (event["type"].as_u64(), event["source"]["id"].as_u64())
        else {
            continue;
        };
        let params = &event["params"];
        match types.get(&kind).copied() {
            // The job's start carries the method and URL; its end carries nothing.
            Some("URL_REQUEST_START_JOB") if params["url"].is_string() => {
                order.push(source);
                let request = requests.entry(source).or_default();
                request.method = params["method"].as_str().unwrap_or_default().to_string();
                request.url = params["url"].as_str().unwrap_or_default().to_string();
            }
            Some("HTTP_TRANSACTION_SEND_REQUEST_HEADERS") if params["headers"].is_array() => {
                requests.entry(source).or_default().sent = headers(params);
            }
            Some("HTTP_TRANSACTION_READ_RESPONSE_HEADERS") if params["headers"].is_array() => {
                let request = requests.entry(source).or_default();
                request.status = params["headers"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                request.received = headers(params);
            }
            _ => {}
        }
    }
    order.dedup();
    order
        .into_iter()
        .filter_map(|id| requests.remove(&id))
        .collect()
}

/// The guide's JavaScript example in headless Chromium, on a page served from another
/// origin than the API: a cross-origin `fetch` with a JSON body, so a CORS preflight first.
#[test]
fn guide_javascript_example_cross_origin() {
    let _serial = one_at_a_time();
    require("chromium", CHROMIUM_INSTALL);
    let server = start_server();
    let script = example_for(JAVASCRIPT_EXAMPLE, &server);
    // Calls the example, then reports the size of the <img> it appended once it has loaded.
    let html = format!(
        r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>the guide's JavaScript example</title></head>
<body>
<pre id="result">pending</pre>
<script>
{script}
const result = document.getElementById('result');
generateImage('A watercolor fox in a snowy forest').then(() => {{
  const img = document.querySelector('body > img');
  if (!img) {{ result.textContent = 'no <img> was appended'; return; }}
  const report = () => {{
    result.textContent = `loaded ${{img.naturalWidth}}x${{img.naturalHeight}}`;
  }};
  if (img.complete && img.naturalWidth > 0) {{ report(); return; }}
  img.onload = report;
  img.onerror = () => {{ result.textContent = 'the <img> failed to load'; }};
}}, (e) => {{ result.textContent = `generateImage failed: ${{e}}`; }});
</script>
</body>
</html>
"#
    );
    let page = PageServer::start(html);
    assert_ne!(
        page.origin(),
        server.url(""),
        "the page must come from another origin"
    );
    let profile = tempfile::tempdir().unwrap();
    let net_log = profile.path().join("netlog.json");
    // Virtual time stands still while a request is pending, so the budget is spent only
    // once the page is idle: --dump-dom then prints the DOM as the script left it.
    let out = run(
        chromium_command(&profile.path().join("profile"))
            .arg(format!("--log-net-log={}", net_log.display()))
            .arg("--virtual-time-budget=600000")
            .arg("--dump-dom")
            .arg(page.url()),
        GENERATION_TIMEOUT,
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chromium failed ({}); stderr:\n{}",
        out.status,
        tail(&stderr, 4000)
    );
    let result = dom
        .split(r#"<pre id="result">"#)
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("no result in the dumped DOM:\n{}", tail(&dom, 4000)));
    assert_eq!(
        result,
        "loaded 512x512",
        "the page's result; server log:\n{}\nchromium stderr:\n{}",
        server.log(),
        tail(&stderr, 4000)
    );
    // The <img> the example appended holds the PNG the server sent.
    let data_url = dom
        .split(r#"<img src="data:image/png;base64,"#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no data: URL <img> in the dumped DOM"));
    check_png(
        "the JavaScript example's image",
        &decode_base64("the data: URL", data_url),
        512,
        512,
    );

    assert_eq!(
        page.requests.lock().unwrap().first().map(String::as_str),
        Some("GET / HTTP/1.1")
    );
    assert_eq!(
        generations_logged(&server),
        1,
        "server log:\n{}",
        server.log()
    );

    // What went over the wire: a preflight, then the POST, both from the page's origin.
    let generate_url = server.url("/generate");
    let requests = net_requests(&net_log);
    let to_api: Vec<&NetRequest> = requests.iter().filter(|r| r.url == generate_url).collect();
    let methods: Vec<&str> = to_api.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        ["OPTIONS", "POST"],
        "requests to {generate_url}: {to_api:#?}"
    );
    let (preflight, post) = (to_api[0], to_api[1]);
    let origin = page.origin();
    assert_eq!(
        preflight.sent("origin"),
        Some(origin.as_str()),
        "{preflight:#?}"
    );
    assert_eq!(
        preflight.sent("access-control-request-method"),
        Some("POST"),
        "{preflight:#?}"
    );
    assert_eq!(
        preflight.sent("access-control-request-headers"),
        Some("content-type"),
        "{preflight:#?}"
    );
    assert!(preflight.status.contains(" 200"), "{preflight:#?}");
    assert!(allows(preflight, &origin), "{preflight:#?}");
    assert!(
        preflight
            .received("access-control-allow-methods")
            .is_some_and(|m| m.split(',').any(|m| m.trim() == "POST")),
        "{preflight:#?}"
    );
    assert_eq!(post.sent("origin"), Some(origin.as_str()), "{post:#?}");
    assert_eq!(
        post.sent("content-type"),
        Some("application/json"),
        "{post:#?}"
    );
    assert!(post.status.contains(" 200"), "{post:#?}");
    assert!(allows(post, &origin), "{post:#?}");
}

/// Headless Chromium driven through the DevTools protocol over `--remote-debugging-pipe`
/// (the browser reads commands on fd 3 and writes replies on fd 4, each message a JSON text
/// ending in a NUL byte); killed when dropped.
struct Browser {
    child: Child,
    commands: ChildStdin,
    replies: Receiver<Value>,
    next_id: u64,
    /// Events that arrived while waiting for replies.
    events: Vec<Value>,
    stderr: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Browser {
        require("chromium", CHROMIUM_INSTALL);
        let profile = tempfile::tempdir().unwrap();
        let stderr = profile.path().join("stderr.txt");
        let chromium = chromium_command(&profile.path().join("profile"));
        // A shell moves the pipes on stdin and stdout to fds 3 and 4, where the browser
        // expects them.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"exec "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg("sh")
            .arg(chromium.get_program())
            .args(chromium.get_args())
            .args(["--remote-debugging-pipe", "about:blank"]);
        for (key, value) in chromium.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting chromium: {e}; {CHROMIUM_INSTALL}"));
        let commands = child.stdin.take().unwrap();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            let mut message = Vec::new();
            match output.read_until(0, &mut message) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if message.last() == Some(&0) {
                message.pop();
            }
            match serde_json::from_slice(&message) {
                Ok(value) => {
                    if tx.send(value).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("chromium sent something that is not JSON ({e})"),
            }
        });
        Browser {
            child,
            commands,
            replies,
            next_id: 0,
            events: Vec::new(),
            stderr,
            _profile: profile,
        }
    }

    fn stderr(&self) -> String {
        tail(
            &std::fs::read_to_string(&self.stderr).unwrap_or_default(),
            4000,
        )
        .to_string()
    }

    /// Sends a command (to a page when `session` is given) and returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        if let Err(e) = self
            .commands
            .write_all(&bytes)
            .and_then(|_| self.commands.flush())
        {
            panic!(
                "sending {method} to chromium: {e}; chromium's stderr:\n{}",
                self.stderr()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = match self
                .replies
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(reply) => reply,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("chromium did not answer {method} in 60 s")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "chromium exited while answering {method}; its stderr:\n{}",
                        self.stderr()
                    )
                }
            };
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    panic!("{method} failed: {error}");
                }
                return reply["result"].clone();
            }
            self.events.push(reply);
        }
    }

    /// A browser showing the page at `GET /` of `server` once it reports the model, and the
    /// page's session id.
    fn open_page(server: &Server) -> (Browser, String) {
        let mut browser = Browser::launch();
        let page = browser.attach_to_page();
        browser.call(Some(&page), "Runtime.enable", json!({}));
        browser.call(
            Some(&page),
            "Page.navigate",
            json!({ "url": server.url("/") }),
        );
        browser.wait_for(
            &page,
            "the page loads and reports the model",
            "document.readyState === 'complete' && document.getElementById('health') !== null && \
             document.getElementById('health').textContent.startsWith('model ')",
            Duration::from_secs(60),
        );
        (browser, page)
    }

    /// Attaches to the page the browser opened with and returns the session id.
    fn attach_to_page(&mut self) -> String {
        let targets = self.call(None, "Target.getTargets", json!({}));
        let page = targets["targetInfos"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page")
            .unwrap_or_else(|| panic!("no page among chromium's targets: {targets}"))["targetId"]
            .clone();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": page, "flatten": true }),
        );
        attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string()
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise) and returns its
    /// value.
    fn eval(&mut self, session: &str, expression: &str) -> Value {
        let result = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating {expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy, returning its value.
    fn wait_for(
        &mut self,
        session: &str,
        what: &str,
        expression: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(session, expression);
            if !(value.is_null() || value == false || value == "") {
                return value;
            }
            if Instant::now() > deadline {
                let page = self.eval(session, "document.body ? document.body.innerText : ''");
                panic!(
                    "{what}: not after {} s; the page shows:\n{}\nerrors: {:#?}",
                    timeout.as_secs(),
                    page.as_str().unwrap_or_default(),
                    self.page_errors()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Uncaught exceptions and console errors the page reported so far.
    fn page_errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.exceptionThrown" => Some(e["params"]["exceptionDetails"].to_string()),
                "Runtime.consoleAPICalled" if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// Replaces the value of the field `id` by typing `text` into it, as a user would.
    fn type_into(&mut self, session: &str, id: &str, text: &str) {
        let focused = self.eval(
            session,
            &format!(
                "(() => {{ const e = document.getElementById({id:?}); if (!e) return false; \
                 e.value = ''; e.focus(); return document.activeElement === e; }})()"
            ),
        );
        assert_eq!(focused, true, "the page has no field #{id} to type into");
        self.call(Some(session), "Input.insertText", json!({ "text": text }));
        let value = self.eval(session, &format!("document.getElementById({id:?}).value"));
        assert_eq!(value, text, "#{id} after typing");
    }

    /// The point of the element `id` at `(fx, fy)`, fractions of its width and height, in
    /// the viewport's coordinates (scrolled into view first).
    fn point_in(&mut self, session: &str, id: &str, (fx, fy): (f64, f64)) -> (f64, f64) {
        let point = self.eval(
            session,
            &format!(
                "(() => {{ const e = document.getElementById({id:?}); \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return {{x: r.x + r.width * {fx}, y: r.y + r.height * {fy}}}; }})()"
            ),
        );
        match (point["x"].as_f64(), point["y"].as_f64()) {
            (Some(x), Some(y)) => (x, y),
            _ => panic!("#{id} has no position: {point}"),
        }
    }

    /// Dispatches one mouse event at `(x, y)`, the left button held from press to release.
    fn mouse(&mut self, session: &str, kind: &str, (x, y): (f64, f64), held: bool) {
        let mut event = json!({ "type": kind, "x": x, "y": y });
        if kind != "mouseMoved" {
            event["button"] = json!("left");
            event["clickCount"] = json!(1);
        }
        if held {
            event["buttons"] = json!(1);
            event["button"] = json!("left");
        }
        self.call(Some(session), "Input.dispatchMouseEvent", event);
    }

    /// Clicks the middle of the element `id` with the mouse.
    fn click(&mut self, session: &str, id: &str) {
        let point = self.point_in(session, id, (0.5, 0.5));
        self.mouse(session, "mouseMoved", point, false);
        self.mouse(session, "mousePressed", point, true);
        self.mouse(session, "mouseReleased", point, false);
    }

    /// Drags the mouse with the left button held across the element `id`, from `from` to
    /// `to` (fractions of its width and height) in a few moves.
    fn drag(&mut self, session: &str, id: &str, from: (f64, f64), to: (f64, f64)) {
        let start = self.point_in(session, id, from);
        let end = self.point_in(session, id, to);
        self.mouse(session, "mouseMoved", start, false);
        self.mouse(session, "mousePressed", start, true);
        const MOVES: u32 = 8;
        for i in 1..=MOVES {
            let t = f64::from(i) / f64::from(MOVES);
            let point = (
                start.0 + (end.0 - start.0) * t,
                start.1 + (end.1 - start.1) * t,
            );
            self.mouse(session, "mouseMoved", point, true);
        }
        self.mouse(session, "mouseReleased", end, false);
    }

    /// Chooses the file at `path` in the file input `id`, which fires its `change` event.
    fn choose_file(&mut self, session: &str, id: &str, path: &Path) {
        let input = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({ "expression": format!("document.getElementById({id:?})") }),
        );
        let object = input["result"]["objectId"]
            .as_str()
            .unwrap_or_else(|| panic!("the page has no file input #{id}: {input}"))
            .to_string();
        self.call(
            Some(session),
            "DOM.setFileInputFiles",
            json!({ "files": [path.to_str().unwrap()], "objectId": object }),
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page at `GET /`, used as a person would: type a prompt and settings, click Generate,
/// and see the image and its seed.
#[test]
fn page_generates_an_image_in_chromium() {
    let _serial = one_at_a_time();
    let server = start_server();
    let (mut browser, page) = Browser::open_page(&server);
    let prompt = "A lighthouse on a rocky coast, oil painting";
    for (id, text) in [
        ("prompt", prompt),
        ("num_inference_steps", "20"),
        ("guidance_scale", "6.5"),
        ("width", "384"),
        ("height", "256"),
        ("seed", "4242"),
    ] {
        browser.type_into(&page, id, text);
    }
    // The scheduler list comes from the server.
    let schedulers = browser.eval(
        &page,
        "Array.from(document.getElementById('scheduler').options).map(o => o.value)",
    );
    assert_eq!(schedulers[0], "", "{schedulers}");
    assert!(
        schedulers.as_array().unwrap().contains(&json!("euler_a")),
        "{schedulers}"
    );
    browser.click(&page, "generate");
    // The progress bar moves with the job's events.
    let progress = browser.wait_for(
        &page,
        "the progress bar moves",
        "(() => { const t = document.getElementById('progress-text').textContent; \
         const m = t.match(/^step (\\d+)\\/(\\d+)/); \
         return m && +m[1] > 0 ? {text: t, max: document.getElementById('progress').max} : null; })()",
        GENERATION_TIMEOUT,
    );
    assert!(
        progress["text"].as_str().unwrap().contains("s left"),
        "{progress}"
    );
    let shown = browser.wait_for(
        &page,
        "the image appears",
        "(() => { const img = document.getElementById('image'); \
         const status = document.getElementById('status'); \
         if (status.className === 'error') return {error: status.textContent}; \
         if (!img || !img.complete || img.naturalWidth === 0) return null; \
         return {width: img.naturalWidth, height: img.naturalHeight, alt: img.alt, \
                 src: img.src, status: status.textContent, \
                 button_enabled: !document.getElementById('generate').disabled}; })()",
        GENERATION_TIMEOUT,
    );
    assert!(
        shown.get("error").is_none(),
        "the page shows an error: {}\nserver log:\n{}",
        shown["error"],
        server.log()
    );
    assert_eq!(
        (shown["width"].as_u64(), shown["height"].as_u64()),
        (Some(384), Some(256)),
        "{}",
        shown["status"]
    );
    assert_eq!(shown["alt"], prompt);
    let status = shown["status"].as_str().unwrap_or_default();
    assert!(
        status.starts_with("seed 4242, 384x256, 20 steps, "),
        "the status reads {status:?}"
    );
    assert_eq!(
        shown["button_enabled"], true,
        "the Generate button is enabled again"
    );
    check_png(
        "the page's image",
        &png_data_url("the page's image", &shown["src"]),
        384,
        256,
    );
    assert!(
        browser.page_errors().is_empty(),
        "the page reported errors: {:#?}",
        browser.page_errors()
    );
    let history = browser.eval(
        &page,
        "Array.from(document.querySelectorAll('#history figcaption')).map(f => f.textContent)",
    );
    assert_eq!(history, json!([format!("seed 4242: {prompt}")]));
    let log = server.log();
    assert!(log.contains("GET / 200"), "server log:\n{log}");
    assert!(log.contains("GET /health 200"), "server log:\n{log}");
    assert_eq!(jobs_logged(&server), 1, "server log:\n{log}");
    assert!(
        log.contains("/events 200"),
        "the page follows the job's events; server log:\n{log}"
    );
}

/// The page's image to image with inpainting: choose a 64x72 PNG as the init image, paint a
/// stroke on the mask over it, and get an image of the init image's size; the page sends the
/// image and a black and white mask as PNG data: URLs, and no width or height.
#[test]
fn page_inpaints_an_init_image_in_chromium() {
    let _serial = one_at_a_time();
    let server = start_server();
    let (mut browser, page) = Browser::open_page(&server);
    let (width, height) = (64, 72);
    let init = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 3) as u8, ((x + y) * 2) as u8])
    });
    let dir = tempfile::tempdir().unwrap();
    let init_path = dir.path().join("init.png");
    init.save(&init_path).unwrap();
    for (id, text) in [("num_inference_steps", "20"), ("seed", "4242")] {
        browser.type_into(&page, id, text);
    }
    browser.choose_file(&page, "init-image", &init_path);
    let shown = browser.wait_for(
        &page,
        "the init image appears",
        "(() => { const c = document.getElementById('init-canvas'); \
         if (!c || c.closest('[hidden]')) return null; \
         const visible = (id) => document.getElementById(id).offsetParent !== null; \
         return {width: c.width, height: c.height, \
                 note: document.getElementById('init-note').textContent, \
                 strength: document.getElementById('strength').value, \
                 strength_shown: visible('strength'), mask_shown: visible('mask-canvas'), \
                 width_shown: visible('width'), height_shown: visible('height')}; })()",
        Duration::from_secs(30),
    );
    assert_eq!(
        shown,
        json!({ "width": width, "height": height, "note": shown["note"], "strength": "0.8",
                "strength_shown": true, "mask_shown": true,
                "width_shown": false, "height_shown": false }),
    );
    assert!(shown["note"].as_str().unwrap().contains("64x72"), "{shown}");
    browser.eval(
        &page,
        "(() => { const b = document.getElementById('brush-size'); b.value = 8; \
         b.dispatchEvent(new Event('input')); })()",
    );
    // A horizontal stroke across the middle of the image.
    browser.drag(&page, "mask-canvas", (0.1, 0.5), (0.9, 0.5));
    assert_eq!(
        browser.eval(&page, "document.getElementById('strength').value"),
        "1",
        "with a mask, the strength not set by hand becomes inpainting's 1"
    );
    // Keep what the page sends.
    browser.eval(
        &page,
        "(() => { const fetchOriginal = window.fetch; window.sent = []; \
         window.fetch = (url, init) => { \
           if (init && init.method === 'POST') window.sent.push({url: String(url), body: JSON.parse(init.body)}); \
           return fetchOriginal(url, init); }; })()",
    );
    browser.click(&page, "generate");
    let result = browser.wait_for(
        &page,
        "the image appears",
        "(() => { const img = document.getElementById('image'); \
         const status = document.getElementById('status'); \
         if (status.className === 'error') return {error: status.textContent}; \
         if (!img || !img.complete || img.naturalWidth === 0) return null; \
         return {width: img.naturalWidth, height: img.naturalHeight, src: img.src, \
                 status: status.textContent}; })()",
        GENERATION_TIMEOUT,
    );
    assert!(
        result.get("error").is_none(),
        "the page shows an error: {}\nserver log:\n{}",
        result["error"],
        server.log()
    );
    assert_eq!(
        (result["width"].as_u64(), result["height"].as_u64()),
        (Some(64), Some(72)),
        "{}",
        result["status"]
    );
    let status = result["status"].as_str().unwrap_or_default();
    assert!(
        status.starts_with("seed 4242, 64x72, "),
        "the status reads {status:?}"
    );
    check_png(
        "the page's image",
        &png_data_url("the page's image", &result["src"]),
        width,
        height,
    );
    let sent = browser.eval(&page, "window.sent");
    let [job] = sent.as_array().map(Vec::as_slice).unwrap_or_default() else {
        panic!("the page sent {sent:#}");
    };
    assert_eq!(job["url"], "/jobs");
    let body = &job["body"];
    for absent in ["width", "height"] {
        assert!(
            body.get(absent).is_none(),
            "the page sent `{absent}`: {}",
            body[absent]
        );
    }
    assert_eq!(body["strength"], 1.0);
    let sent_init = image::load_from_memory(&png_data_url("init_image", &body["init_image"]))
        .unwrap()
        .to_rgb8();
    assert_eq!(sent_init.dimensions(), (width, height), "init_image");
    let off = sent_init
        .pixels()
        .zip(init.pixels())
        .flat_map(|(a, b)| a.0.into_iter().zip(b.0).map(|(a, b)| a.abs_diff(b)))
        .max();
    assert!(
        off <= Some(2),
        "init_image differs from the file by up to {off:?}"
    );
    let mask = image::load_from_memory(&png_data_url("mask_image", &body["mask_image"]))
        .unwrap()
        .to_luma8();
    assert_eq!(mask.dimensions(), (width, height), "mask_image");
    assert!(
        mask.pixels().all(|p| p.0 == [0] || p.0 == [255]),
        "the mask is black and white"
    );
    // The stroke: white across the middle row, black in the corners.
    assert_eq!(mask.get_pixel(width / 2, height / 2).0, [255], "the stroke");
    for (x, y) in [(0, 0), (width - 1, height - 1)] {
        assert_eq!(mask.get_pixel(x, y).0, [0], "({x}, {y}) was not painted");
    }
    assert_eq!(jobs_logged(&server), 1, "server log:\n{}", server.log());
    // Removing the init image brings width and height back.
    browser.click(&page, "clear-init");
    let back = browser.eval(
        &page,
        "(() => { const w = document.getElementById('width'); \
         return {width: w.offsetParent !== null && !w.disabled, \
                 editor: document.getElementById('mask-canvas').offsetParent !== null}; })()",
    );
    assert_eq!(back, json!({ "width": true, "editor": false }));
    assert!(
        browser.page_errors().is_empty(),
        "the page reported errors: {:#?}",
        browser.page_errors()
    );
}

/// The page's Cancel button stops a long generation and frees the engine.
#[test]
fn page_cancels_a_generation_in_chromium() {
    let _serial = one_at_a_time();
    let server = start_server();
    let (mut browser, page) = Browser::open_page(&server);
    browser.type_into(&page, "num_inference_steps", "150");
    browser.click(&page, "generate");
    browser.wait_for(
        &page,
        "the job runs",
        "/^step [1-9]/.test(document.getElementById('progress-text').textContent)",
        GENERATION_TIMEOUT,
    );
    browser.click(&page, "cancel");
    let status = browser.wait_for(
        &page,
        "the page says the job was cancelled",
        "(() => { const s = document.getElementById('status'); \
         return s.className === 'error' ? s.textContent : null; })()",
        Duration::from_secs(60),
    );
    assert!(status.as_str().unwrap().contains("cancelled"), "{status}");
    assert_eq!(
        browser.eval(&page, "document.getElementById('generate').disabled"),
        false
    );
    assert_eq!(server.get("/health").json()["busy"], false);
    assert!(server.log().contains("DELETE /jobs/"), "{}", server.log());
    assert!(
        browser.page_errors().is_empty(),
        "{:#?}",
        browser.page_errors()
    );
}
