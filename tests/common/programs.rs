//! Running the external programs the tests use as clients (curl, chromium, python3).

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails, naming the package to install, when `program` cannot be started.
pub fn require(program: &str, install: &str) {
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(_) => {}
        Err(e) => panic!("`{program}` cannot be run ({e}); these tests need it: {install}"),
    }
}

/// Runs `command` to completion, killing it after `timeout`.
pub fn run(command: &mut Command, timeout: Duration) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut data = Vec::new();
            let _ = pipe.read_to_end(&mut data);
            data
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "{what} did not finish in {} s; stderr:\n{}",
                timeout.as_secs(),
                tail(&String::from_utf8_lossy(&stderr), 4000)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// What the Python clients need (`.ci/run` installs them).
pub const PIP_INSTALL: &str =
    "python3 -m pip install webuiapi openai prometheus_client openapi-spec-validator";

/// Runs tests/clients/`script` with `args`; the last line it prints is one JSON value (the
/// clients may print their own messages before it). `context` (a server log) is shown if
/// it fails.
pub fn python_script(script: &str, args: &[&str], context: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let output = run(
        super::without_proxies(Command::new("python3").arg(&path).args(args)),
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}); it needs: {PIP_INSTALL}\n{}\nserver log:\n{}",
        output.status,
        tail(&stderr, 4000),
        tail(context, 4000)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {}", tail(&stdout, 2000)))
}
