//! The worker's handle that the rest of the server holds: wake it, stop
//! it, cancel the running job, and see which job runs and which models are
//! loaded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::engine::{CancelToken, LoadedModel};

/// What the API shares with the worker thread.
#[derive(Debug, Default)]
pub struct WorkerShared {
    wake: Mutex<bool>,
    cv: Condvar,
    running: Mutex<Option<(String, CancelToken)>>,
    stopping: AtomicBool,
    loaded: Mutex<Vec<LoadedModel>>,
}

impl WorkerShared {
    /// Wake the worker (a job was queued).
    pub fn wake(&self) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    pub(super) fn wait(&self, timeout: Duration) {
        let guard = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }

    /// Stop: the running job is interrupted and goes back to the queue.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some((_, token)) = &*self.running.lock().unwrap_or_else(|e| e.into_inner()) {
            token.cancel();
        }
        self.wake();
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Cancel job `id` if it is the running one; true when it was.
    pub fn cancel(&self, id: &str) -> bool {
        match &*self.running.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((running, token)) if running == id => {
                token.cancel();
                true
            }
            _ => false,
        }
    }

    /// The running job's id.
    pub fn running(&self) -> Option<String> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(id, _)| id.clone())
    }

    /// The models the engine has loaded, most recently used first.
    pub fn loaded(&self) -> Vec<LoadedModel> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_running(&self, value: Option<(String, CancelToken)>) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    pub(super) fn set_loaded(&self, loaded: Vec<LoadedModel>) {
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = loaded;
    }
}
