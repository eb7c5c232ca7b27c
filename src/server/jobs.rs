//! Jobs: generations that outlive the request that started them. `POST /jobs` queues one
//! and answers at once; clients follow it by polling `GET /jobs/{id}` or as Server-Sent
//! Events (`GET /jobs/{id}/events`), and `DELETE /jobs/{id}` cancels it. The engine's
//! queue, limits and cost check are the same as for /generate.
//!
//! Each job's state is one `watch` value, updated by a task that follows the engine's
//! progress and result; pollers read it, event streams subscribe to it. A watcher that
//! falls behind skips intermediate steps, never the final state.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use utoipa::ToSchema;

use super::body::JsonBody;
use super::error::{ApiError, ErrorBody};
use super::request::GenerateBody;
use super::routes::{
    generated_body, over_time_limit, prepare, submit_error, AppState, GenerateResponse,
};
use crate::engine::{JobTicket, Progress};
use crate::error::{Error, Result};
use crate::pipeline::{GenerateParams, Generated};

/// How long, and how many, finished jobs stay readable.
#[derive(Clone, Copy, Debug)]
pub struct JobRetention {
    pub keep_for: Duration,
    pub keep_count: usize,
}

impl Default for JobRetention {
    /// Ten minutes and a hundred jobs: enough for a client that polls every few seconds
    /// to see the end, and at most ~100 images (a few MB each at 1024x1024) held.
    fn default() -> Self {
        JobRetention {
            keep_for: Duration::from_secs(600),
            keep_count: 100,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What `GET /jobs/{id}` answers, and what each event is made from.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    /// 0-based place in the line while queued; null otherwise.
    pub queue_position: Option<usize>,
    /// Denoising steps done, of `steps`.
    pub step: usize,
    pub steps: usize,
    /// The /generate answer, once succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<GenerateResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Counts the changes, for the events' `id:`.
    #[serde(skip)]
    version: u64,
}

struct JobEntry {
    /// Dropping it cancels the job; taken when the job ends or is cancelled.
    ticket: Mutex<Option<JobTicket>>,
    view: watch::Sender<JobView>,
}

impl JobEntry {
    fn ticket(&self) -> MutexGuard<'_, Option<JobTicket>> {
        // Only ever set or taken: a panic cannot leave it half-changed.
        self.ticket.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut JobView)) {
        self.view.send_modify(|view| {
            change(view);
            view.version += 1;
        });
    }
}

/// The jobs the server knows: all that are queued or running (bounded by the engine's
/// queue), and the finished ones within [`JobRetention`].
pub struct Jobs {
    retention: JobRetention,
    table: Mutex<JobTable>,
}

#[derive(Default)]
struct JobTable {
    by_id: HashMap<String, Arc<JobEntry>>,
    /// Finished jobs, oldest first, with when they finished.
    finished: VecDeque<(Instant, String)>,
}

impl Jobs {
    pub fn new(retention: JobRetention) -> Jobs {
        Jobs {
            retention,
            table: Mutex::new(JobTable::default()),
        }
    }

    /// Every change is one map or deque call, so a poisoned lock leaves the table whole.
    fn table(&self) -> MutexGuard<'_, JobTable> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let JobRetention {
            keep_for,
            keep_count,
        } = self.retention;
        while let Some((finished_at, id)) = table.finished.front().cloned() {
            if table.finished.len() <= keep_count && finished_at.elapsed() < keep_for {
                break;
            }
            table.finished.pop_front();
            table.by_id.remove(&id);
        }
        table
    }

    fn get(&self, id: &str) -> Result<Arc<JobEntry>, ApiError> {
        self.table().by_id.get(id).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no job {id:?} (finished jobs are kept for {} s)",
                    self.retention.keep_for.as_secs()
                ),
            )
        })
    }

    fn finished(&self, id: &str) {
        self.table()
            .finished
            .push_back((Instant::now(), id.to_string()));
    }
}

/// What `POST /jobs` answers.
#[derive(Serialize, ToSchema)]
pub struct JobCreated {
    id: String,
    status: JobStatus,
    /// Where `GET` gives the job's state.
    status_url: String,
    /// Where its Server-Sent Events are.
    events_url: String,
}

/// A job id: 128 random bits in hex, so that one client cannot guess (and cancel)
/// another's job.
fn new_job_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut id = String::with_capacity(32);
    for part in 0..2u8 {
        // RandomState is seeded from the OS's randomness once per process and advanced
        // for each instance.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(part);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        id.push_str(&format!("{:016x}", h.finish()));
    }
    id
}

/// `POST /jobs`: the /generate body; 202 with where to follow the job.
#[utoipa::path(post, path = "/jobs", tag = "jobs", request_body = GenerateBody,
    responses((status = 202, description = "Queued", body = JobCreated),
              (status = 400, description = "A field is wrong", body = ErrorBody),
              (status = 503, description = "The queue is full (Retry-After), or the model is not ready", body = ErrorBody)))]
pub async fn create(
    State(app): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let params = prepare(&app, &body)?;
    let (result, ticket) = app
        .engine
        .submit(params.clone())
        .map_err(|e| submit_error(&app, e))?;
    let id = new_job_id();
    let progress = ticket.progress();
    let view = JobView {
        id: id.clone(),
        status: JobStatus::Queued,
        queue_position: ticket.queue_position(),
        step: 0,
        steps: params.steps,
        result: None,
        error: None,
        version: 0,
    };
    let entry = Arc::new(JobEntry {
        ticket: Mutex::new(Some(ticket)),
        view: watch::Sender::new(view),
    });
    app.jobs.table().by_id.insert(id.clone(), entry.clone());
    tokio::spawn(follow(
        app.clone(),
        id.clone(),
        entry,
        params,
        progress,
        result,
    ));
    let body = JobCreated {
        status_url: format!("/jobs/{id}"),
        events_url: format!("/jobs/{id}/events"),
        id,
        status: JobStatus::Queued,
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

enum Ended {
    Finished(Result<Generated>),
    OverTime,
}

/// Keeps a job's view up to date until it ends: its place in the line, its steps, and
/// its result or error.
async fn follow(
    app: Arc<AppState>,
    id: String,
    entry: Arc<JobEntry>,
    params: GenerateParams,
    mut progress: watch::Receiver<Progress>,
    result: oneshot::Receiver<Result<Generated>>,
) {
    let started = Instant::now();
    let deadline = app
        .time_limit
        .map(|limit| tokio::time::Instant::now() + limit);
    let over_time = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(result, over_time);
    // Others ahead may leave; the line is short, so looking twice a second is cheap.
    let mut recount = tokio::time::interval(Duration::from_millis(500));
    let mut watching = true;
    let ended = loop {
        tokio::select! {
            // A job taken out of the line drops its reply sender: cancelled.
            outcome = &mut result => break Ended::Finished(outcome.unwrap_or(Err(Error::Cancelled))),
            _ = &mut over_time => break Ended::OverTime,

            changed = progress.changed(), if watching => {
                if changed.is_err() {
                    // The job ended or left the line; its result comes next.
                    watching = false;
                    continue;
                }
                if let Progress::Running { step, steps } = *progress.borrow_and_update() {
                    let seen = {
                        let view = entry.view.borrow();
                        view.status == JobStatus::Running && (view.step, view.steps) == (step, steps)
                    };
                    // The engine's "started" and the pipeline's first step say the same.
                    if seen {
                        continue;
                    }
                    entry.update(|view| {
                        view.status = JobStatus::Running;
                        view.queue_position = None;
                        view.step = step;
                        view.steps = steps;
                    });
                }
            }
            _ = recount.tick() => {
                let position = entry.ticket().as_ref().and_then(|t| t.queue_position());
                if entry.view.borrow().queue_position != position {
                    entry.update(|view| view.queue_position = position);
                }
            }
        }
    };
    // Dropping the ticket stops the job if it still runs (over time).
    entry.ticket().take();
    let (status, result, error) = match ended {
        Ended::Finished(Ok(generated)) => {
            match generated_body(&params, &generated, started.elapsed()) {
                Ok(body) => (JobStatus::Succeeded, Some(body), None),
                Err(e) => (JobStatus::Failed, None, Some(e.message)),
            }
        }
        Ended::Finished(Err(Error::Cancelled)) => {
            let why = if app.engine.is_shutting_down() {
                "the job was cancelled: the server is shutting down"
            } else {
                "the job was cancelled"
            };
            (JobStatus::Cancelled, None, Some(why.to_string()))
        }
        Ended::Finished(Err(e)) => (JobStatus::Failed, None, Some(ApiError::from(e).message)),
        Ended::OverTime => {
            let limit = app.time_limit.unwrap_or_default();
            (
                JobStatus::Failed,
                None,
                Some(over_time_limit(limit).message),
            )
        }
    };
    entry.update(|view| {
        view.status = status;
        view.queue_position = None;
        if status == JobStatus::Succeeded {
            view.step = view.steps;
        }
        view.result = result;
        view.error = error;
    });
    app.jobs.finished(&id);
}

/// `GET /jobs/{id}`.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    responses((status = 200, description = "The job", body = JobView),
              (status = 404, description = "No such job, or it finished too long ago", body = ErrorBody)))]
pub async fn status(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let entry = app.jobs.get(&id)?;
    let view = entry.view.borrow().clone();
    Ok(Json(view))
}

/// `DELETE /jobs/{id}`: cancels a queued or running job (a running one stops within one
/// tensor op) and answers with its status once it has stopped; a finished job is left as
/// it is.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    responses((status = 200, description = "The job once stopped (a finished job as it was)", body = JobView),
              (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn cancel(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let entry = app.jobs.get(&id)?;
    // Dropping the ticket cancels the job.
    entry.ticket().take();
    let mut view = entry.view.subscribe();
    // An op in flight finishes first: seconds at most on a slow CPU at a large size.
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        view.wait_for(|v| v.status.is_final()),
    )
    .await;
    let now = entry.view.borrow().clone();
    if stopped.is_err() {
        tracing::warn!("job {id} was cancelled but has not stopped yet");
    }
    Ok(Json(now))
}

/// `GET /jobs/{id}/events`: Server-Sent Events, the current state first, then each change
/// until the job ends: `queued` (its place), `progress` (steps), then `completed` (the
/// /generate answer), `failed` or `cancelled` (the error).
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    responses((status = 200, description = "Server-Sent Events: `queued` {queue_position}, `progress` {step, steps}, then `completed` (a GenerateResponse), `failed` or `cancelled` {error}", content_type = "text/event-stream", body = String),
              (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn events(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let entry = app.jobs.get(&id)?;
    let mut watcher = entry.view.subscribe();
    watcher.mark_changed();
    // The stream owns the subscription, and ends after the final event.
    let events = stream::unfold(Some(watcher), |watcher| async move {
        let mut watcher = watcher?;
        // The sender lives in the job table, which outlives the stream's last event: a
        // closed channel only comes when the job was evicted, and then the stream ends.
        watcher.changed().await.ok()?;
        let view = watcher.borrow_and_update().clone();
        let next = (!view.status.is_final()).then_some(watcher);
        Some((Ok(event_of(&view)), next))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

fn event_of(view: &JobView) -> Event {
    let (name, data) = match view.status {
        JobStatus::Queued => ("queued", json!({ "queue_position": view.queue_position })),
        JobStatus::Running => (
            "progress",
            json!({ "step": view.step, "steps": view.steps }),
        ),
        JobStatus::Succeeded => (
            "completed",
            serde_json::to_value(&view.result).unwrap_or(Value::Null),
        ),
        JobStatus::Failed => ("failed", json!({ "error": view.error })),
        JobStatus::Cancelled => ("cancelled", json!({ "error": view.error })),
    };
    Event::default()
        .event(name)
        .id(view.version.to_string())
        .data(data.to_string())
}
