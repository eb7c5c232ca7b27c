//! Jobs with progress (`POST /jobs`, `GET /jobs/{id}`, its Server-Sent Events, `DELETE`) on
//! the real binary, with `curl -N` as the event client.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use serde_json::Value;

use common::model_dir;
use common::server::{busy, request, wait_until, Server, LONG_JOB, SMALL_JOB};

/// One Server-Sent Event.
#[derive(Debug)]
struct SseEvent {
    name: String,
    id: u64,
    data: Value,
}

/// An event stream followed by `curl -N`, its events passed on as they come.
struct EventStream {
    events: Receiver<SseEvent>,
}

impl EventStream {
    fn follow(server: &Server, path: &str) -> EventStream {
        let url = server.url(path);
        let mut curl = common::without_proxies(&mut Command::new("curl"))
            .args(["-sSN", "--max-time", "300", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running curl ({e}); these tests need it: apt-get install curl")
            });
        let stdout = BufReader::new(curl.stdout.take().unwrap());
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut block = String::new();
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if !line.is_empty() {
                    block.push_str(&line);
                    block.push('\n');
                    continue;
                }
                if let Some(event) = parse_event(&block) {
                    if tx.send(event).is_err() {
                        break;
                    }
                }
                block.clear();
            }
            let status = curl.wait().unwrap();
            assert!(status.success(), "curl -N {url}: {status}");
        });
        EventStream { events }
    }

    /// The next event, waiting for it.
    fn next(&self) -> SseEvent {
        self.events
            .recv_timeout(Duration::from_secs(120))
            .expect("an event within 120 s")
    }

    /// The events still to come, until the server ends the stream.
    fn rest(self) -> Vec<SseEvent> {
        self.events.iter().collect()
    }
}

/// One event block of an SSE stream; `None` for a comment (keep-alive).
fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut name, mut id, mut data) = (None, None, None);
    for line in block.lines() {
        let (field, value) = line.split_once(':')?;
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value.to_string()),
            "id" => id = Some(value.parse().expect("a numeric event id")),
            "data" => data = Some(serde_json::from_str(value).expect("JSON event data")),
            _ => {}
        }
    }
    Some(SseEvent {
        name: name?,
        id: id.expect("every event has an id"),
        data: data.expect("every event has data"),
    })
}

fn create_job(server: &Server, body: &str) -> Value {
    let r = server.post_json("/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()
}

fn job(server: &Server, id: &str) -> Value {
    let r = server.get(&format!("/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn wait_for_status(server: &Server, id: &str, status: &str) -> Value {
    let mut last = Value::Null;
    wait_until(
        &format!("job {id} is {status}"),
        Duration::from_secs(120),
        || {
            last = job(server, id);
            last["status"] == status
        },
    );
    last
}

fn cancel(server: &Server, id: &str) -> Value {
    let r = request(server.addr, "DELETE", &format!("/jobs/{id}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn a_job_reports_its_steps_and_ends_with_the_generate_answer() {
    let server = Server::start(&model_dir("sd1"), &[]);
    server.wait_ready();
    let body = r#"{"prompt": "a red door", "width": 64, "height": 64, "num_inference_steps": 12, "seed": 11}"#;
    let created = create_job(&server, body);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "queued");
    assert_eq!(created["status_url"], format!("/jobs/{id}"));
    assert_eq!(created["events_url"], format!("/jobs/{id}/events"));
    let events = EventStream::follow(&server, created["events_url"].as_str().unwrap()).rest();

    // The state when curl connected, then each change: ids rise, steps rise to the end.
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    assert!(
        events.windows(2).all(|w| w[0].id < w[1].id),
        "ids: {events:?}"
    );
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e.name == "progress")
        .map(|e| {
            (
                e.data["step"].as_u64().unwrap(),
                e.data["steps"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(progress.len() >= 2, "{names:?}");
    assert!(progress.windows(2).all(|w| w[0].0 < w[1].0), "{progress:?}");
    let (last_step, steps) = *progress.last().unwrap();
    assert_eq!(last_step, steps, "{progress:?}");
    assert!(
        names
            .iter()
            .skip_while(|n| **n == "queued")
            .all(|n| *n == "progress" || *n == "completed"),
        "{names:?}"
    );

    // The same pixels and parameters as /generate with the same body.
    let completed = &events.last().unwrap().data;
    let direct = server.post_json("/generate", body);
    assert_eq!(direct.status, 200, "{}", direct.text());
    let direct = direct.json();
    for field in [
        "image",
        "seed",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
    ] {
        assert_eq!(completed[field], direct[field], "{field}");
    }

    let status = job(&server, &id);
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["step"], status["steps"]);
    assert!(status["queue_position"].is_null());
    assert_eq!(status["result"]["image"], direct["image"]);
    assert!(status.get("error").is_none(), "{status}");

    // A client that comes after the end gets the end, and the stream closes.
    let late = EventStream::follow(&server, &format!("/jobs/{id}/events")).rest();
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].name, "completed");
    assert_eq!(late[0].data["image"], direct["image"]);
}

#[test]
fn queued_and_running_jobs_can_be_cancelled() {
    let server = Server::start(&model_dir("sd1"), &["--queue-size", "1"]);
    server.wait_ready();
    let running = create_job(&server, LONG_JOB)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = wait_for_status(&server, &running, "running");
    assert!(seen["steps"].as_u64().unwrap() >= 150, "{seen}");
    let events = EventStream::follow(&server, &format!("/jobs/{running}/events"));
    // Connected: the current state comes first.
    assert_eq!(events.next().name, "progress");

    let queued = create_job(&server, SMALL_JOB)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let waiting = job(&server, &queued);
    assert_eq!(waiting["status"], "queued");
    assert_eq!(waiting["queue_position"], 0);
    // The queue is shared with /generate: full is full for both.
    let full = server.post_json("/jobs", SMALL_JOB);
    assert_eq!(full.status, 503, "{}", full.text());
    assert!(full.header("retry-after").is_some());
    assert!(full.error().contains("queue is full"));

    let queued_events = EventStream::follow(&server, &format!("/jobs/{queued}/events"));
    let first = queued_events.next();
    assert_eq!(first.name, "queued", "{first:?}");
    assert_eq!(first.data["queue_position"], 0, "{first:?}");

    let answer = cancel(&server, &queued);
    assert_eq!(answer["status"], "cancelled", "{answer}");
    let rest = queued_events.rest();
    assert_eq!(
        rest.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["cancelled"],
        "{rest:?}"
    );
    assert_eq!(server.get("/health").json()["queue_length"], 0);

    let answer = cancel(&server, &running);
    assert_eq!(answer["status"], "cancelled", "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("cancelled"));
    assert!(!busy(&server), "the engine is free when DELETE answers");
    let events = events.rest();
    let last = events.last().expect("the end of the job");
    assert_eq!(last.name, "cancelled", "{events:?}");
    server.wait_for_log("stopped a running job");

    // Cancelling what has ended changes nothing.
    assert_eq!(cancel(&server, &running)["status"], "cancelled");
    let done = create_job(&server, SMALL_JOB)["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for_status(&server, &done, "succeeded");
    assert_eq!(cancel(&server, &done)["status"], "succeeded");
}

#[test]
fn bad_bodies_unknown_ids_and_old_jobs_are_refused() {
    let server = Server::start(&model_dir("sd1"), &["--jobs-kept", "1"]);
    server.wait_ready();
    let bad = server.post_json("/jobs", r#"{"prompt": "a", "width": 65}"#);
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.error().contains("width"), "{}", bad.error());
    let plain = request(
        server.addr,
        "POST",
        "/jobs",
        &[("Content-Type", "text/plain")],
        SMALL_JOB.as_bytes(),
    );
    assert_eq!(plain.status, 415, "{}", plain.text());

    for (method, path) in [
        ("GET", "/jobs/0123456789abcdef"),
        ("GET", "/jobs/0123456789abcdef/events"),
        ("DELETE", "/jobs/0123456789abcdef"),
    ] {
        let r = request(server.addr, method, path, &[], b"");
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(r.error().contains("no job"), "{}", r.error());
    }

    // Only the newest finished job is kept here.
    let first = create_job(&server, SMALL_JOB)["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for_status(&server, &first, "succeeded");
    let second = create_job(&server, SMALL_JOB)["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for_status(&server, &second, "succeeded");
    assert_ne!(first, second);
    assert_eq!(server.get(&format!("/jobs/{first}")).status, 404);
    assert_eq!(job(&server, &second)["status"], "succeeded");
}

#[test]
fn finished_jobs_expire_and_jobs_keep_the_time_limit() {
    let server = Server::start(
        &model_dir("sd1"),
        &["--jobs-kept-for", "1", "--request-timeout", "30"],
    );
    server.wait_ready();
    let done = create_job(&server, SMALL_JOB)["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for_status(&server, &done, "succeeded");
    wait_until("the finished job expires", Duration::from_secs(10), || {
        server.get(&format!("/jobs/{done}")).status == 404
    });

    // One step at 512x512 takes minutes on the tiny model's 4-wide attention heads, far
    // past the 30 s limit, though its cost estimate lets it in (as in tests/hardening.rs).
    let large =
        r#"{"prompt": "a large job", "width": 512, "height": 512, "num_inference_steps": 1}"#;
    let id = create_job(&server, large)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let failed = wait_for_status(&server, &id, "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("limit of 30 s"), "{failed}");
    wait_until("the engine is free", Duration::from_secs(30), || {
        !busy(&server)
    });
    server.wait_for_log("stopped a running job");
}
