//! The workers' handle that the rest of the server holds: wake them, stop
//! them, cancel a running job, and see which device each computes on,
//! whether it is busy and which models it has loaded.
//!
//! There is one worker per configured device (`device = [...]`), each with
//! its own engine and model cache; they share this handle, indexed by the
//! worker's position in the device list.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::engine::{CancelToken, LoadedModel};

/// One worker's slot: its device and what it is doing.
#[derive(Debug, Default)]
struct Slot {
    device: String,
    running: Mutex<Option<(String, CancelToken)>>,
    loaded: Mutex<Vec<LoadedModel>>,
}

/// What the API shares with the worker threads.
#[derive(Debug)]
pub struct WorkerShared {
    /// Bumped by [`WorkerShared::wake`]; each worker waits for it to move
    /// past the value it last saw, so one wake reaches every idle worker.
    wake: Mutex<u64>,
    cv: Condvar,
    stopping: AtomicBool,
    slots: Vec<Slot>,
}

/// One worker as `/readyz` describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkerStatus {
    /// The device it computes on (`cpu`, `cuda:0`; the fake engine: the
    /// device as configured).
    pub device: String,
    /// Whether it is running a job.
    pub busy: bool,
    /// The models in its cache, most recently used first.
    pub loaded: Vec<LoadedModel>,
}

impl WorkerShared {
    /// The handle of one worker per entry of `devices` (their names, in
    /// worker order).
    pub fn new(devices: Vec<String>) -> Self {
        Self {
            wake: Mutex::new(0),
            cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            slots: devices
                .into_iter()
                .map(|device| Slot {
                    device,
                    ..Slot::default()
                })
                .collect(),
        }
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    /// Wake the idle workers (a job was queued).
    pub fn wake(&self) {
        let mut count = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.wrapping_add(1);
        self.cv.notify_all();
    }

    /// Wait until a wake newer than `seen` (updated to it) or `timeout`.
    pub(super) fn wait(&self, seen: &mut u64, timeout: Duration) {
        let guard = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |c| *c == *seen)
            .unwrap_or_else(|e| e.into_inner());
        *seen = *count;
    }

    /// The wake count now (a worker's starting `seen`).
    pub(super) fn wakes(&self) -> u64 {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop: every running job is interrupted and goes back to the queue.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            if let Some((_, token)) = &*slot.running.lock().unwrap_or_else(|e| e.into_inner()) {
                token.cancel();
            }
        }
        self.wake();
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Cancel job `id` if a worker is running it; true when one was.
    pub fn cancel(&self, id: &str) -> bool {
        for slot in &self.slots {
            if let Some((running, token)) = &*slot.running.lock().unwrap_or_else(|e| e.into_inner())
            {
                if running == id {
                    token.cancel();
                    return true;
                }
            }
        }
        false
    }

    /// Each worker's device name, in worker order.
    pub fn devices(&self) -> Vec<String> {
        self.slots.iter().map(|slot| slot.device.clone()).collect()
    }

    /// The device and state of each worker, in worker order.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.slots
            .iter()
            .map(|slot| WorkerStatus {
                device: slot.device.clone(),
                busy: slot
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some(),
                loaded: slot
                    .loaded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            })
            .collect()
    }

    /// The models the workers have loaded: each worker's, most recently
    /// used first, in worker order (a model loaded by two workers is
    /// listed twice: it holds memory on both devices).
    pub fn loaded(&self) -> Vec<LoadedModel> {
        self.slots
            .iter()
            .flat_map(|slot| {
                slot.loaded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .collect()
    }

    /// The device name of worker `worker`.
    pub(super) fn device(&self, worker: usize) -> &str {
        &self.slots[worker].device
    }

    pub(super) fn set_running(&self, worker: usize, value: Option<(String, CancelToken)>) {
        *self.slots[worker]
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = value;
    }

    pub(super) fn set_loaded(&self, worker: usize, loaded: Vec<LoadedModel>) {
        *self.slots[worker]
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = loaded;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One wake reaches every waiting worker (a bool flag would let the
    /// first consume it and leave the others asleep until their timeout).
    #[test]
    fn one_wake_reaches_every_waiting_worker() {
        let shared = std::sync::Arc::new(WorkerShared::new(vec!["a".into(), "b".into()]));
        let start = shared.wakes();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mut seen = start;
                    let t = std::time::Instant::now();
                    shared.wait(&mut seen, Duration::from_secs(20));
                    (seen, t.elapsed())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        shared.wake();
        for w in waiters {
            let (seen, waited) = w.join().unwrap();
            assert_eq!(seen, start + 1);
            assert!(waited < Duration::from_secs(10), "{waited:?}");
        }
    }

    #[test]
    fn cancel_finds_the_worker_running_the_job() {
        let shared = WorkerShared::new(vec!["cuda:0".into(), "cuda:1".into()]);
        let (a, b) = (CancelToken::new(), CancelToken::new());
        shared.set_running(0, Some(("job-a".into(), a.clone())));
        shared.set_running(1, Some(("job-b".into(), b.clone())));
        assert!(shared.cancel("job-b"));
        assert!(b.is_canceled() && !a.is_canceled());
        assert!(!shared.cancel("job-c"));
        let workers = shared.workers();
        assert_eq!(workers.len(), 2);
        assert_eq!(workers[1].device, "cuda:1");
        assert!(workers[0].busy && workers[1].busy);
        shared.set_running(0, None);
        assert!(!shared.workers()[0].busy);
        let c = CancelToken::new();
        shared.set_running(0, Some(("job-c".into(), c.clone())));
        shared.stop();
        assert!(c.is_canceled() && !a.is_canceled());
    }
}
