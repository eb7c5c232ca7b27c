//! The engine: one worker thread owns the model and runs one generation at a time while
//! requests wait in a bounded FIFO ([`queue`]). It knows nothing of HTTP: the server (and
//! anything else) submits [`GenerateParams`] and gets a [`Generated`] back. A job whose
//! submitter has gone (or whose time ran out) leaves the line at once if it is waiting, and
//! stops within one tensor op if it is running (see `tensor::interrupt`).

pub mod queue;
pub mod stats;

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::model::source::{ModelInfo, ModelOptions};
use crate::pipeline::cost::StepCost;
use crate::pipeline::{GenerateParams, Generated, ModelDefaults, ParamsCheck, StableDiffusion};
use crate::tensor::interrupt::{self, Interrupt};
use crate::tensor::Device;
use queue::{JobQueue, PushError};
use stats::{GenerationStats, Outcome, Stats};

/// Where the model is in its life.
#[derive(Clone, Debug)]
pub enum ModelState {
    Loading,
    Ready,
    Failed(String),
}

/// How far a submitted job has come, as its watchers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for the engine.
    Queued,
    /// `step` of `steps` denoising steps done (0 when it has just started).
    Running { step: usize, steps: usize },
}

/// A request to generate one image.
struct Job {
    params: GenerateParams,
    interrupt: Interrupt,
    progress: watch::Sender<Progress>,
    reply: oneshot::Sender<Result<Generated>>,
}

/// A submitted job's handle: dropping it before the result arrives (the client
/// disconnected, or its time ran out) cancels the job, and frees its place in the line at
/// once if it has not started.
pub struct JobTicket {
    id: u64,
    interrupt: Interrupt,
    queue: Arc<JobQueue<Job>>,
    progress: watch::Receiver<Progress>,
}

impl JobTicket {
    /// Follows the job's progress; the sender goes away when the job ends or leaves.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// 0-based place in the line while the job waits.
    pub fn queue_position(&self) -> Option<usize> {
        self.queue.position(self.id)
    }
}

impl Drop for JobTicket {
    fn drop(&mut self) {
        self.interrupt.cancel();
        if self.queue.remove(self.id).is_some() {
            tracing::info!("a waiting job left the queue: its client is gone");
        }
    }
}

struct RunningJob {
    interrupt: Interrupt,
    progress: watch::Receiver<Progress>,
    started: Instant,
}

/// What the engine is doing now.
#[derive(Clone, Copy, Debug)]
pub struct Activity {
    /// Denoising steps done and in all, and how long ago it started, for the running job.
    pub running: Option<(usize, usize, std::time::Duration)>,
    pub queued: usize,
}

/// Why a job could not be queued.
pub enum SubmitError {
    /// The parameters do not suit the loaded model (its size multiple, its scheduler).
    Invalid(Error),
    NotReady(ModelState),
    QueueFull,
    ShuttingDown,
}

/// The handle on the engine thread that submitters share.
pub struct Engine {
    state: RwLock<ModelState>,
    queue: Arc<JobQueue<Job>>,
    /// The running job, for shutting down, interrupting and reporting progress.
    running: Mutex<Option<RunningJob>>,
    busy: AtomicBool,
    shutdown: AtomicBool,
    pub model: PathBuf,
    /// `--model-config` and `--vae`.
    pub model_options: ModelOptions,
    /// What was loaded (folder or single file, configs, tokenizer), and what requests
    /// that leave them out get from it, once loaded.
    info: RwLock<Option<(ModelInfo, ModelDefaults)>>,
    /// Replaced when a lost GPU is opened again.
    device: RwLock<Device>,
    /// Whether to time a UNet step after loading (only worth its seconds when requests
    /// are checked against a time limit).
    measure_step_cost: bool,
    /// What a step costs, measured at load.
    cost: RwLock<Option<StepCost>>,
    /// The loaded model's rules for parameters.
    params_check: RwLock<Option<ParamsCheck>>,
    stats: Stats,
}

/// What an engine serves, and how.
pub struct EngineConfig {
    pub model: PathBuf,
    /// `--model-config` and `--vae`.
    pub model_options: ModelOptions,
    pub device: Device,
    /// Jobs that may wait while one runs.
    pub queue_capacity: usize,
    /// Time a UNet step once loaded, for [`Engine::step_cost`].
    pub measure_step_cost: bool,
}

/// The side of the engine that owns the model: loads it, then runs jobs one at a time.
pub struct EngineWorker {
    engine: Arc<Engine>,
}

impl EngineWorker {
    /// Loads the model and serves jobs until the engine shuts down; returns early if the
    /// model cannot be loaded (the engine then reports the failure).
    pub fn run(self) {
        self.engine.run()
    }
}

impl Engine {
    /// The engine and its worker, which loads the model and then serves jobs on whichever
    /// thread calls [`EngineWorker::run`].
    pub fn new(config: EngineConfig) -> (Arc<Engine>, EngineWorker) {
        let EngineConfig {
            model,
            model_options,
            device,
            queue_capacity,
            measure_step_cost,
        } = config;
        let engine = Arc::new(Engine {
            state: RwLock::new(ModelState::Loading),
            queue: Arc::new(JobQueue::new(queue_capacity)),
            running: Mutex::new(None),
            busy: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            model,
            model_options,
            info: RwLock::new(None),
            device: RwLock::new(device),
            measure_step_cost,
            cost: RwLock::new(None),
            params_check: RwLock::new(None),
            stats: Stats::default(),
        });
        let worker = EngineWorker {
            engine: engine.clone(),
        };
        (engine, worker)
    }

    /// [`Engine::new`] with the worker on a thread of its own.
    pub fn start(config: EngineConfig) -> Arc<Engine> {
        let (engine, worker) = Engine::new(config);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || worker.run())
            .expect("spawning the engine thread");
        engine
    }

    pub fn state(&self) -> ModelState {
        self.state
            .read()
            .map(|s| s.clone())
            .unwrap_or(ModelState::Failed("engine state poisoned".into()))
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
            .read()
            .map(|d| d.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// What a denoising step costs at least, once the model is ready (`None` if it could
    /// not be timed).
    pub fn step_cost(&self) -> Option<StepCost> {
        self.cost.read().ok().and_then(|c| c.clone())
    }

    /// What was loaded, once the model is ready.
    pub fn info(&self) -> Option<ModelInfo> {
        self.info
            .read()
            .ok()
            .and_then(|i| i.as_ref().map(|(info, _)| info.clone()))
    }

    /// The loaded model's defaults for what a request leaves out.
    pub fn model_defaults(&self) -> Option<ModelDefaults> {
        self.info
            .read()
            .ok()
            .and_then(|i| i.as_ref().map(|(_, d)| *d))
    }

    fn set_state(&self, state: ModelState) {
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
    }

    /// Jobs waiting (not the running one).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// The model as it was named, without the file system around it: a folder's or file's
    /// own name for a path, a Hub id or `weights/` name as given.
    pub fn model_name(&self) -> String {
        let given = &self.model;
        let is_path = given.is_absolute() || given.starts_with(".") || given.starts_with("..");
        match given.file_name() {
            Some(name) if is_path => name.to_string_lossy().into_owned(),
            _ => given.display().to_string(),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// Queues a job; the receiver gets its result. The job is cancelled when the returned
    /// ticket is dropped before the result arrives.
    pub fn submit(
        &self,
        params: GenerateParams,
    ) -> Result<(oneshot::Receiver<Result<Generated>>, JobTicket), SubmitError> {
        if self.shutdown.load(Ordering::Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        match self.state() {
            ModelState::Ready => {}
            other => return Err(SubmitError::NotReady(other)),
        }
        if let Some(check) = &*self.params_check.read().unwrap_or_else(|p| p.into_inner()) {
            check.check(&params).map_err(SubmitError::Invalid)?;
        }
        let interrupt = Interrupt::new();
        let (reply, result) = oneshot::channel();
        let (progress, watcher) = watch::channel(Progress::Queued);
        let job = Job {
            params,
            interrupt: interrupt.clone(),
            progress,
            reply,
        };
        match self.queue.push(job) {
            Ok(id) => Ok((
                result,
                JobTicket {
                    id,
                    interrupt,
                    queue: self.queue.clone(),
                    progress: watcher,
                },
            )),
            Err(PushError::Full) => Err(SubmitError::QueueFull),
            Err(PushError::Closed) => Err(SubmitError::ShuttingDown),
        }
    }

    /// Stops taking jobs, answers those waiting as cancelled and stops the running one.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        for job in self.queue.close() {
            let _ = job.reply.send(Err(Error::Cancelled));
        }
        self.cancel_running();
    }

    /// Stops the running job within one tensor op (its submitter sees it cancelled);
    /// false when none runs.
    pub fn cancel_running(&self) -> bool {
        match &*self.running() {
            Some(running) => {
                running.interrupt.cancel();
                true
            }
            None => false,
        }
    }

    /// The running job's progress and the line's length.
    pub fn activity(&self) -> Activity {
        let running = self.running().as_ref().map(|job| {
            let (step, steps) = match *job.progress.borrow() {
                Progress::Running { step, steps } => (step, steps),
                Progress::Queued => (0, 0),
            };
            (step, steps, job.started.elapsed())
        });
        Activity {
            running,
            queued: self.queued(),
        }
    }

    /// Set and cleared whole, so a poisoned lock holds a consistent value.
    fn running(&self) -> std::sync::MutexGuard<'_, Option<RunningJob>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let Some(mut sd) = self.load() else {
            // Jobs are refused while not Ready, so nothing waits on the queue.
            return;
        };
        loop {
            let job = match self.queue.try_pop() {
                Some(job) => job,
                None => {
                    // Idle: what the last generation (or the load) freed goes back to the
                    // system; it is kept for reuse while jobs run (see keep_freed_memory).
                    crate::backend::cpu::release_freed_memory();
                    sd.device().release_idle_memory();
                    match self.queue.pop() {
                        Some(job) => job,
                        None => return,
                    }
                }
            };
            if job.interrupt.is_cancelled() {
                continue;
            }
            self.busy.store(true, Ordering::Relaxed);
            *self.running() = Some(RunningJob {
                interrupt: job.interrupt.clone(),
                progress: job.progress.subscribe(),
                started: Instant::now(),
            });
            // A shutdown that came between the pop and the line above.
            if self.shutdown.load(Ordering::Relaxed) {
                job.interrupt.cancel();
            }
            let started = Instant::now();
            let result = self.generate(&sd, &job);
            self.record(&job, &result, started.elapsed());
            // Logged before the engine reports itself free, so that whoever sees it free
            // also finds the line.
            if matches!(result, Err(Error::Cancelled)) {
                tracing::info!("stopped a running job: its client is gone, its time ran out, it was interrupted or the server is stopping");
            }
            *self.running() = None;
            self.busy.store(false, Ordering::Relaxed);
            let lost = match self.device() {
                Device::Gpu(gpu) if gpu.is_lost() => Some(gpu),
                _ => None,
            };
            if lost.is_some() {
                // Before the failed job's answer, so nothing is taken for the lost device.
                self.set_state(ModelState::Loading);
            }
            let _ = job.reply.send(result);
            if let Some(gpu) = lost {
                drop(sd);
                let Some(reloaded) = self.reload_after_losing(&gpu) else {
                    return;
                };
                sd = reloaded;
            }
        }
    }

    /// Opens the lost GPU's adapter again and loads the model onto it; the queue waits.
    fn reload_after_losing(&self, gpu: &crate::backend::gpu::GpuDevice) -> Option<StableDiffusion> {
        match crate::backend::gpu::GpuDevice::new(Some(&gpu.name())) {
            Ok(fresh) => {
                tracing::warn!("the GPU was lost; loading the model again on a new device");
                *self.device.write().unwrap_or_else(|p| p.into_inner()) = Device::Gpu(fresh);
                self.load()
            }
            Err(e) => {
                let why = format!("the GPU was lost and cannot be opened again: {e}");
                tracing::error!("{why}");
                self.set_state(ModelState::Failed(why));
                None
            }
        }
    }

    /// Loads the model onto the engine's device: Ready, or Failed with the reason.
    fn load(&self) -> Option<StableDiffusion> {
        let started = Instant::now();
        let device = self.device();
        tracing::info!("loading model {} on {device}", self.model.display());
        let load = || StableDiffusion::load_named(&self.model, &self.model_options, &device);
        // A panic while loading fails the model (reported by /health), not the process.
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(load)).unwrap_or_else(|panic| {
            Err(Error::Other(format!(
                "internal error: {}",
                panic_message(&*panic)
            )))
        });
        match loaded {
            Ok(sd) => {
                tracing::info!("model loaded in {:.1}s", started.elapsed().as_secs_f64());
                if let Ok(mut info) = self.info.write() {
                    *info = Some((sd.info().clone(), sd.defaults()));
                }
                *self.params_check.write().unwrap_or_else(|p| p.into_inner()) =
                    Some(sd.params_check());
                // Before Ready, so that every request is checked against it.
                let cost = self
                    .measure_step_cost
                    .then(|| self.measure(&sd, &device))
                    .flatten();
                *self.cost.write().unwrap_or_else(|p| p.into_inner()) = cost;
                self.set_state(ModelState::Ready);
                Some(sd)
            }
            Err(e) => {
                tracing::error!("model failed to load: {e}");
                self.set_state(ModelState::Failed(e.to_string()));
                None
            }
        }
    }

    /// Times a UNet step; `None` (logged) if that fails, which leaves requests unchecked.
    fn measure(&self, sd: &StableDiffusion, device: &Device) -> Option<StepCost> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| StepCost::measure(sd))) {
            Ok(Ok(cost)) => {
                tracing::info!("measured on {device}: {cost}");
                Some(cost)
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    "could not time a UNet step ({e}); requests are not checked against the time limit"
                );
                None
            }
            Err(panic) => {
                tracing::warn!("timing a UNet step panicked: {}", panic_message(&*panic));
                None
            }
        }
    }

    fn record(&self, job: &Job, result: &Result<Generated>, took: std::time::Duration) {
        let (outcome, denoise) = match result {
            Ok(generated) => (Outcome::Succeeded, generated.timings.denoise),
            Err(Error::Cancelled) => (Outcome::Cancelled, Default::default()),
            Err(_) => (Outcome::Failed, Default::default()),
        };
        let steps = match *job.progress.borrow() {
            Progress::Running { steps, .. } => steps,
            Progress::Queued => 0,
        };
        self.stats.record(outcome, took, steps, denoise);
    }

    /// Generations so far, by outcome and time.
    pub fn stats(&self) -> GenerationStats {
        self.stats.snapshot()
    }

    fn generate(&self, sd: &StableDiffusion, job: &Job) -> Result<Generated> {
        // The count the pipeline's own events will carry, so progress never changes total.
        let steps = sd
            .params_check()
            .unet_evaluations(&job.params)
            .unwrap_or(job.params.steps);
        job.progress
            .send_replace(Progress::Running { step: 0, steps });
        let mut on_step = |ev: crate::pipeline::StepEvent| {
            tracing::debug!("{}/{} steps done", ev.step, ev.total);
            job.progress.send_replace(Progress::Running {
                step: ev.step,
                steps: ev.total,
            });
            if job.interrupt.is_cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let run = || interrupt::scope(&job.interrupt, || sd.generate(&job.params, &mut on_step));
        // A panic in the engine fails this job, not the server.
        match std::panic::catch_unwind(AssertUnwindSafe(run)) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic_message(&*panic);
                tracing::error!("generation panicked: {what}");
                Err(Error::Other(format!("internal error: {what}")))
            }
        }
    }
}

/// The message a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn wait_until_ready(engine: &Engine) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match engine.state() {
                ModelState::Ready => return,
                ModelState::Failed(why) => panic!("the model failed to load: {why}"),
                ModelState::Loading if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                ModelState::Loading => panic!("the model did not load in time"),
            }
        }
    }

    fn run_job(engine: &Engine) -> Result<Generated> {
        let params = GenerateParams {
            prompt: "a lost device".into(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            steps: 2,
            guidance_scale: 7.5,
            width: 32,
            height: 32,
            seed: 3,
            scheduler: None,
            scheduler_overrides: Default::default(),
            init: None,
            loras: Vec::new(),
            prompt_syntax: Default::default(),
        };
        let Ok((reply, _guard)) = engine.submit(params) else {
            panic!("the engine refused a job while ready");
        };
        reply.blocking_recv().expect("the engine answers every job")
    }

    /// A GPU lost during a job fails that job with an error that says so; the engine opens
    /// the adapter again, reloads the model and serves the next job with the same image.
    #[test]
    fn a_lost_gpu_fails_its_job_and_the_engine_recovers() {
        let Some(shared) = crate::backend::gpu::test_device() else {
            return;
        };
        let gpu = crate::backend::gpu::GpuDevice::new(Some(&shared.name())).unwrap();
        let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1");
        // Timing a step is left out: on llvmpipe it costs ~10 s a load, and this loads twice.
        let engine = Engine::start(EngineConfig {
            model,
            model_options: Default::default(),
            device: Device::Gpu(gpu.clone()),
            queue_capacity: 2,
            measure_step_cost: false,
        });
        wait_until_ready(&engine);
        let before = run_job(&engine)
            .expect("a job on a working GPU")
            .image
            .pixels;

        gpu.lose_for_test();
        match run_job(&engine) {
            Err(Error::Gpu(message)) => assert!(message.contains("lost"), "{message}"),
            other => panic!("a job on a lost GPU gave {:?}", other.map(|g| g.seed)),
        }
        wait_until_ready(&engine);
        let Device::Gpu(fresh) = engine.device() else {
            panic!("the engine left the GPU")
        };
        assert!(!fresh.is_lost() && fresh.name() == gpu.name());
        let after = run_job(&engine).expect("a job after recovery").image.pixels;
        assert_eq!(before, after, "the reloaded model makes the same image");
    }
}
