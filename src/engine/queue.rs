//! The engine's waiting line: a bounded FIFO whose jobs can leave before their turn, so a
//! client that gives up frees its place at once (a channel could only skip it when its turn
//! came, counting it as waiting until then).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Full,
    Closed,
}

pub struct JobQueue<J> {
    state: Mutex<Line<J>>,
    arrived: Condvar,
    capacity: usize,
}

struct Line<J> {
    waiting: VecDeque<(u64, J)>,
    next_id: u64,
    closed: bool,
}

impl<J> JobQueue<J> {
    pub fn new(capacity: usize) -> Self {
        JobQueue {
            state: Mutex::new(Line {
                waiting: VecDeque::new(),
                next_id: 0,
                closed: false,
            }),
            arrived: Condvar::new(),
            capacity,
        }
    }

    /// A panic while holding the lock leaves the line itself consistent (every change is
    /// one VecDeque call), so a poisoned lock is taken over.
    fn line(&self) -> MutexGuard<'_, Line<J>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a job at the end; its id is for [`JobQueue::remove`].
    pub fn push(&self, job: J) -> Result<u64, PushError> {
        let mut line = self.line();
        if line.closed {
            return Err(PushError::Closed);
        }
        if line.waiting.len() >= self.capacity {
            return Err(PushError::Full);
        }
        let id = line.next_id;
        line.next_id += 1;
        line.waiting.push_back((id, job));
        self.arrived.notify_one();
        Ok(id)
    }

    /// Takes job `id` out of the line if it is still waiting.
    pub fn remove(&self, id: u64) -> Option<J> {
        let mut line = self.line();
        let at = line.waiting.iter().position(|(i, _)| *i == id)?;
        line.waiting.remove(at).map(|(_, job)| job)
    }

    /// The next job, without waiting.
    pub fn try_pop(&self) -> Option<J> {
        self.line().waiting.pop_front().map(|(_, job)| job)
    }

    /// The next job, waiting for one; `None` once the queue is closed.
    pub fn pop(&self) -> Option<J> {
        let mut line = self.line();
        loop {
            if line.closed {
                return None;
            }
            if let Some((_, job)) = line.waiting.pop_front() {
                return Some(job);
            }
            line = self.arrived.wait(line).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Refuses new jobs, wakes the worker and hands back those that were waiting.
    pub fn close(&self) -> Vec<J> {
        let mut line = self.line();
        line.closed = true;
        self.arrived.notify_all();
        line.waiting.drain(..).map(|(_, job)| job).collect()
    }

    /// 0-based place of job `id` in the line, if it is waiting.
    pub fn position(&self, id: u64) -> Option<usize> {
        self.line().waiting.iter().position(|(i, _)| *i == id)
    }

    pub fn len(&self) -> usize {
        self.line().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_leaves_frees_its_place() {
        let queue = JobQueue::new(2);
        let a = queue.push("a").unwrap();
        let b = queue.push("b").unwrap();
        assert_eq!(queue.push("c"), Err(PushError::Full));
        assert_eq!(queue.position(b), Some(1));
        assert_eq!(queue.remove(a), Some("a"));
        assert_eq!(queue.remove(a), None, "already gone");
        assert_eq!(queue.position(b), Some(0));
        queue.push("c").unwrap();
        assert_eq!(queue.try_pop(), Some("b"));
        assert_eq!(queue.close(), vec!["c"]);
        assert_eq!(queue.pop(), None);
        assert_eq!(queue.push("d"), Err(PushError::Closed));
    }

    #[test]
    fn pop_waits_for_a_job() {
        let queue = std::sync::Arc::new(JobQueue::new(1));
        let worker = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.pop())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        queue.push(7).unwrap();
        assert_eq!(worker.join().unwrap(), Some(7));
    }
}
