//! Prometheus metrics, in the text exposition format (`GET /metrics`).
//!
//! Counters and a histogram kept in atomics; gauges (queue depth, running
//! jobs, loaded models) are read when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the job duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs accepted.
    pub jobs_accepted: AtomicU64,
    /// Jobs finished, by status.
    pub jobs_succeeded: AtomicU64,
    /// Jobs that failed.
    pub jobs_failed: AtomicU64,
    /// Jobs canceled.
    pub jobs_canceled: AtomicU64,
    /// Images stored.
    pub images_generated: AtomicU64,
    /// Requests refused: full queue.
    pub rejected_queue_full: AtomicU64,
    /// Requests refused: out of credit.
    pub rejected_credit: AtomicU64,
    /// Submissions refused: the key's rate limit.
    pub rejected_rate_limited: AtomicU64,
    /// Webhooks delivered.
    pub webhooks_delivered: AtomicU64,
    /// Webhook attempts that failed.
    pub webhooks_failed_attempts: AtomicU64,
    /// Engine batches run.
    pub batches: AtomicU64,
    durations: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Gauges read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Jobs queued.
    pub queued: i64,
    /// Jobs running.
    pub running: i64,
    /// Models loaded.
    pub models_loaded: usize,
    /// Bytes of loaded models (estimated).
    pub models_bytes: u64,
}

impl Metrics {
    /// Count one.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a finished job's run time (start to finish, seconds).
    pub fn observe_job_duration(&self, seconds: f64) {
        let mut h = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// The exposition text.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "easel_queue_depth",
            "gauge",
            "Jobs waiting for the worker.",
            &one(gauges.queued.to_string()),
        );
        metric(
            "easel_jobs_running",
            "gauge",
            "Jobs the worker is running.",
            &one(gauges.running.to_string()),
        );
        metric(
            "easel_models_loaded",
            "gauge",
            "Models in the worker's cache.",
            &one(gauges.models_loaded.to_string()),
        );
        metric(
            "easel_models_loaded_bytes",
            "gauge",
            "Estimated memory of the loaded models.",
            &one(gauges.models_bytes.to_string()),
        );
        metric(
            "easel_jobs_accepted_total",
            "counter",
            "Jobs accepted.",
            &one(get(&self.jobs_accepted).to_string()),
        );
        metric(
            "easel_jobs_finished_total",
            "counter",
            "Jobs finished, by status.",
            &[
                (
                    "{status=\"succeeded\"}".into(),
                    get(&self.jobs_succeeded).to_string(),
                ),
                (
                    "{status=\"failed\"}".into(),
                    get(&self.jobs_failed).to_string(),
                ),
                (
                    "{status=\"canceled\"}".into(),
                    get(&self.jobs_canceled).to_string(),
                ),
            ],
        );
        metric(
            "easel_job_failures_total",
            "counter",
            "Jobs that failed.",
            &one(get(&self.jobs_failed).to_string()),
        );
        metric(
            "easel_images_generated_total",
            "counter",
            "Images generated and stored.",
            &one(get(&self.images_generated).to_string()),
        );
        metric(
            "easel_batches_total",
            "counter",
            "Engine batches run.",
            &one(get(&self.batches).to_string()),
        );
        metric(
            "easel_requests_rejected_total",
            "counter",
            "Generation requests refused before any work, by reason.",
            &[
                (
                    "{reason=\"queue_full\"}".into(),
                    get(&self.rejected_queue_full).to_string(),
                ),
                (
                    "{reason=\"insufficient_credit\"}".into(),
                    get(&self.rejected_credit).to_string(),
                ),
                (
                    "{reason=\"rate_limited\"}".into(),
                    get(&self.rejected_rate_limited).to_string(),
                ),
            ],
        );
        metric(
            "easel_webhook_deliveries_total",
            "counter",
            "Webhook delivery attempts, by result.",
            &[
                (
                    "{result=\"delivered\"}".into(),
                    get(&self.webhooks_delivered).to_string(),
                ),
                (
                    "{result=\"failed\"}".into(),
                    get(&self.webhooks_failed_attempts).to_string(),
                ),
            ],
        );
        let h = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<(String, String)> = DURATION_BUCKETS
            .iter()
            .zip(h.buckets)
            .map(|(b, n)| (format!("_bucket{{le=\"{b}\"}}"), n.to_string()))
            .collect();
        lines.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
        lines.push(("_sum".into(), h.sum.to_string()));
        lines.push(("_count".into(), h.count.to_string()));
        metric(
            "easel_job_duration_seconds",
            "histogram",
            "Run time of finished jobs (start to finish).",
            &lines,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        Metrics::inc(&m.jobs_accepted);
        m.observe_job_duration(0.3);
        m.observe_job_duration(7.0);
        let text = m.render(Gauges {
            queued: 3,
            ..Gauges::default()
        });
        assert!(text.contains("easel_queue_depth 3\n"), "{text}");
        assert!(text.contains("easel_jobs_accepted_total 1\n"));
        assert!(text.contains("easel_job_duration_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("easel_job_duration_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("easel_job_duration_seconds_count 2\n"));
    }
}
