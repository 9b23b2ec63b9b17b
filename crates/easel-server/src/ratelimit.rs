//! Per-key rate limiting of submissions: a token bucket per API key.
//!
//! Every submission (`POST /v1/generations`, `/v1/images/generations`,
//! `/v1/images/edits`, `/v1/flows/{id}/runs`) takes one token from its key's
//! bucket. A bucket holds at most `rate_limit_burst` tokens and refills at
//! `rate_limit_per_minute` tokens per minute (continuously, not per
//! minute boundary). A submission finding no token is answered 429
//! `rate_limited` with `Retry-After` (whole seconds until a token is back,
//! at least 1), in the route's error shape; nothing is stored.
//!
//! The buckets live in memory: a restart refills them, and two processes
//! on one data dir do not share them. `rate_limit_per_minute = 0` turns the
//! limit off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::error::ApiError;

/// The buckets of every key seen since start.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second (0: no limit).
    per_second: f64,
    /// Most tokens a bucket holds.
    burst: f64,
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// A limiter refilling `per_minute` tokens per minute into buckets of
    /// `burst` tokens; `per_minute = 0` never limits.
    pub fn new(per_minute: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token from `key`'s bucket at time `now`; `Err(wait)` with
    /// the time until one is back when the bucket is empty.
    pub fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    /// Take one token for a submission by `key`, or the 429 `rate_limited`
    /// error (with `Retry-After`) to answer.
    ///
    /// # Errors
    /// The key's bucket is empty.
    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        self.take_at(key, Instant::now()).map_err(|wait| {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many submissions with this API key: at most {} per minute, in bursts \
                     of at most {} (rate_limit_per_minute, rate_limit_burst); retry in {seconds} s",
                    self.per_minute, self.burst as u64
                ),
            );
            e.retry_after = Some(seconds);
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let limiter = RateLimiter::new(60, 3); // one token per second
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take_at("a", t0).unwrap();
        }
        let wait = limiter.take_at("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // Another key has its own bucket.
        limiter.take_at("b", t0).unwrap();
        // Half a second refills half a token: still empty.
        let wait = limiter
            .take_at("a", t0 + Duration::from_millis(500))
            .unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        limiter.take_at("a", t0 + Duration::from_secs(1)).unwrap();
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.take_at("a", later).unwrap();
        }
        assert!(limiter.take_at("a", later).is_err());
    }

    #[test]
    fn zero_per_minute_is_off_and_errors_say_when_to_retry() {
        let off = RateLimiter::new(0, 1);
        for _ in 0..1000 {
            off.check("a").unwrap();
        }
        let limiter = RateLimiter::new(6, 1); // one token per 10 s
        limiter.check("a").unwrap();
        let e = limiter.check("a").unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.code, "rate_limited");
        assert_eq!(e.retry_after, Some(10));
        assert!(e.message.contains("rate_limit_per_minute"), "{}", e.message);
    }
}
