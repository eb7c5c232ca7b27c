//! Stopping a network part-way: the engine runs each job inside [`scope`] with the job's
//! [`Interrupt`], and every tensor op checks it first (see `ops::begin`), so a cancelled or
//! timed-out job stops within one op wherever it is (text encoder, a UNet block, a VAE
//! band) instead of at the next denoising step. A thread-local, because ops run on the
//! calling thread and the job is the one running there; outside a scope nothing is checked.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A cancellation flag shared by whoever may cancel a job and the thread running it.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

thread_local! {
    static CURRENT: RefCell<Vec<Interrupt>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `interrupt` checked by every op on this thread (scopes nest: any of
/// them cancelled stops the ops).
pub fn scope<R>(interrupt: &Interrupt, f: impl FnOnce() -> R) -> R {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            CURRENT.with(|c| c.borrow_mut().pop());
        }
    }
    CURRENT.with(|c| c.borrow_mut().push(interrupt.clone()));
    let _pop = Pop; // popped on return and on unwind alike
    f()
}

/// Runs `f` outside every scope this thread is in: for work whose result must not be cut
/// short by the job that happens to run it (a measurement taken while a model loads).
pub fn unscoped<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Vec<Interrupt>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = std::mem::take(&mut self.0);
            CURRENT.with(|c| *c.borrow_mut() = outer);
        }
    }
    let _restore = Restore(CURRENT.with(|c| std::mem::take(&mut *c.borrow_mut())));
    f()
}

/// The interrupts this thread runs under, to be checked from other threads: an op whose
/// one call runs long (CPU attention at large sizes takes tens of seconds) takes a watch
/// before spreading its work and skips the rest once cancelled, then [`check`] fails it.
#[derive(Clone, Debug, Default)]
pub struct Watch(Vec<Interrupt>);

impl Watch {
    pub fn is_cancelled(&self) -> bool {
        self.0.iter().any(Interrupt::is_cancelled)
    }
}

pub fn watch() -> Watch {
    Watch(CURRENT.with(|c| c.borrow().clone()))
}

/// `Err(Error::Cancelled)` once a scope this thread runs in was cancelled.
pub fn check() -> Result<()> {
    let cancelled = CURRENT.with(|c| c.borrow().iter().any(Interrupt::is_cancelled));
    if cancelled {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_scopes_own_thread_sees_its_interrupt() {
        let job = Interrupt::new();
        assert!(check().is_ok());
        scope(&job, || {
            assert!(check().is_ok());
            job.cancel();
            assert!(matches!(check(), Err(Error::Cancelled)));
            let seen_elsewhere = watch();
            std::thread::scope(|s| {
                s.spawn(|| {
                    assert!(check().is_ok());
                    assert!(seen_elsewhere.is_cancelled());
                });
            });
        });
        assert!(check().is_ok(), "the scope ended with its closure");
    }

    #[test]
    fn unscoped_work_sees_no_interrupt_and_the_scopes_come_back() {
        let job = Interrupt::new();
        job.cancel();
        scope(&job, || {
            assert!(check().is_err());
            unscoped(|| {
                assert!(check().is_ok());
                assert!(!watch().is_cancelled());
            });
            assert!(check().is_err(), "back after the closure");
            let panicked = std::panic::catch_unwind(|| unscoped(|| panic!("in unscoped work")));
            assert!(panicked.is_err());
            assert!(check().is_err(), "back after a panic");
        });
        assert!(check().is_ok());
    }
}
