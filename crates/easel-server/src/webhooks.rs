//! Webhooks: events a request subscribed to (`webhook` + `webhookEvents`)
//! are put in an outbox table and delivered by a background task, so the
//! worker never waits on a client's server.
//!
//! Each delivery is a `POST` of a JSON body
//! `{"id", "type", "created_at", "data": <the job>}` with headers
//! `Easel-Event` (`generation.started`, `generation.progress`,
//! `generation.completed`), `Easel-Delivery` (a UUID, the same on retries)
//! and `Easel-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">` keyed with the server's webhook secret. A non-2xx answer
//! or a network error is retried with exponential backoff
//! (`webhook_backoff_ms`, doubling, at most one hour) up to
//! `webhook_max_attempts` times; progress events are sent once, never retried.
//!
//! Deliveries go through the outbound fetcher ([`crate::fetch`]): the URL
//! was checked at submission and is checked again at each delivery (DNS may
//! have changed); a refused address is never connected to and not retried.
//! Redirects are not followed.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::fetch::{FetchError, Fetcher};
use crate::metrics::Metrics;
use crate::store::DeliveryRow;
use crate::util::now_ms;
use crate::AppState;

/// The signature header of a body sent at unix time `t`.
pub fn signature(secret: &[u8], t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Check a signature header against a body (what a receiver does).
pub fn verify(secret: &[u8], header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v.to_string()),
            _ => {}
        }
    }
    match (t, v1) {
        (Some(t), Some(_)) => signature(secret, t, body) == header.trim(),
        _ => false,
    }
}

/// The delay before retry number `attempt` (1-based): `base_ms · 2^(attempt-1)`,
/// at most one hour.
pub fn backoff_ms(base_ms: u64, attempt: u32) -> u64 {
    let factor = 1u64 << attempt.saturating_sub(1).min(30);
    base_ms.saturating_mul(factor).min(3_600_000)
}

/// POST one delivery through the outbound fetcher (blocking; run off the
/// async runtime). `Ok` on 2xx; an address the fetcher refuses is never
/// connected to.
fn post(
    fetcher: &Fetcher,
    delivery: &DeliveryRow,
    secret: &[u8],
    timeout: Duration,
) -> Result<(), FetchError> {
    let t = now_ms() / 1000;
    let signature = signature(secret, t, &delivery.payload);
    fetcher.post_json(
        &delivery.url,
        &[
            ("Easel-Event", &delivery.event),
            ("Easel-Delivery", &delivery.id),
            ("Easel-Signature", &signature),
        ],
        &delivery.payload,
        timeout,
    )
}

/// The dispatcher: deliver due events, sleeping until the next one is due
/// or a new one is queued. Runs until the server shuts down.
pub async fn run_dispatcher(state: AppState) {
    let secret = state.webhook_secret().to_vec();
    let timeout = Duration::from_secs(state.config().webhook_timeout_seconds.max(1));
    let base = state.config().webhook_backoff_ms;
    loop {
        if state.is_shutting_down() {
            return;
        }
        let (due, next) = match state.store().due_deliveries(16).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("webhook outbox: {e}");
                (Vec::new(), Some(now_ms() + 1000))
            }
        };
        let mut handles = Vec::new();
        for delivery in due {
            let secret = secret.clone();
            let fetcher = state.fetcher().clone();
            handles.push(tokio::task::spawn_blocking(move || {
                let result = post(&fetcher, &delivery, &secret, timeout);
                (delivery, result)
            }));
        }
        let had_work = !handles.is_empty();
        for handle in handles {
            let Ok((delivery, result)) = handle.await else {
                continue;
            };
            let attempt = delivery.attempts + 1;
            let (delivered, error, retry_at) = match result {
                Ok(()) => {
                    Metrics::inc(&state.metrics().webhooks_delivered);
                    (true, None, None)
                }
                Err(e) => {
                    Metrics::inc(&state.metrics().webhooks_failed_attempts);
                    tracing::info!(
                        "webhook {} {} to {} failed (attempt {attempt}): {}",
                        delivery.event,
                        delivery.id,
                        delivery.url,
                        e.detail
                    );
                    // A refused address stays refused: no retry.
                    let retry = (e.retryable() && attempt < delivery.max_attempts)
                        .then(|| now_ms() + backoff_ms(base, attempt as u32) as i64);
                    (false, Some(e.detail), retry)
                }
            };
            if let Err(e) = state
                .store()
                .record_delivery(&delivery.id, delivered, error.as_deref(), retry_at)
                .await
            {
                tracing::warn!("webhook outbox: {e}");
            }
        }
        if had_work {
            continue;
        }
        let wait = next
            .map(|t| (t - now_ms()).clamp(10, 1000) as u64)
            .unwrap_or(1000);
        tokio::select! {
            _ = state.webhook_wake().notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let header = signature(b"secret", 1700000000, "{\"a\":1}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert!(verify(b"secret", &header, "{\"a\":1}"));
        assert!(!verify(b"secret", &header, "{\"a\":2}"));
        assert!(!verify(b"other", &header, "{\"a\":1}"));
        // RFC 4231 test case 2 (HMAC-SHA256, key "Jefe").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff_ms(1000, 1), 1000);
        assert_eq!(backoff_ms(1000, 2), 2000);
        assert_eq!(backoff_ms(1000, 5), 16000);
        assert_eq!(backoff_ms(1000, 40), 3_600_000);
    }

    /// A delivery whose address is refused is never connected to and is not
    /// retried (the check at submission may be stale: DNS can change).
    #[test]
    fn finding_2_ssrf_webhook_to_a_forbidden_address_is_never_attempted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let fetcher = Fetcher::new(crate::fetch::AllowList::default()).recording();
        for url in [
            format!("http://{}/hook", listener.local_addr().unwrap()),
            "http://169.254.169.254/hook".to_string(),
        ] {
            let delivery = DeliveryRow {
                id: "d".into(),
                generation_id: "g".into(),
                url,
                event: "generation.completed".into(),
                payload: "{}".into(),
                attempts: 0,
                max_attempts: 6,
            };
            let e = post(&fetcher, &delivery, b"k", Duration::from_secs(2)).unwrap_err();
            assert!(!e.retryable(), "{e:?}");
        }
        assert!(fetcher.handed_out().is_empty());
        assert_eq!(
            listener.accept().map_err(|e| e.kind()).unwrap_err(),
            std::io::ErrorKind::WouldBlock
        );
    }
}
