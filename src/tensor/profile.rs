//! The per-op profile of the CPU backend (`SD_CPU_PROFILE=1`, or [`set_enabled`]): wall
//! time of every tensor op, summed by op kind (`conv2d 3x3`, `linear`, `attention`, ...).
//!
//! Ops run one after another on the calling thread (each spreads its own work over the
//! thread pool and returns when done), so on the CPU these times add up to the network's
//! time. GPU ops only record their commands and return, so their times here mean little:
//! use `SD_GPU_PROFILE=1` there. Off, each op pays one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static TOTALS: Mutex<Option<HashMap<&'static str, (u64, Duration)>>> = Mutex::new(None);

/// Whether ops are being timed: [`set_enabled`], else `SD_CPU_PROFILE=1` (read once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("SD_CPU_PROFILE").is_ok_and(|v| v.trim() == "1");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

pub fn set_enabled(on: bool) {
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Calls and total wall time of one op kind.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    pub time: Duration,
}

/// The totals since the last call, longest first; starts the next period at zero.
pub fn take() -> Vec<OpTime> {
    let totals = TOTALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let mut ops: Vec<OpTime> = totals
        .into_iter()
        .map(|(op, (calls, time))| OpTime { op, calls, time })
        .collect();
    ops.sort_by(|a, b| b.time.cmp(&a.time).then(a.op.cmp(b.op)));
    ops
}

/// Times one op from now until it is dropped.
pub(crate) struct Scope(Option<(&'static str, Instant)>);

pub(crate) fn scope(op: &'static str) -> Scope {
    Scope(enabled().then(|| (op, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((op, start)) = self.0 {
            let elapsed = start.elapsed();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals
                .get_or_insert_with(HashMap::new)
                .entry(op)
                .or_default();
            entry.0 += 1;
            entry.1 += elapsed;
        }
    }
}
