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
//! A Replicate prediction's deliveries (event `prediction.start`,
//! `prediction.progress`, `prediction.completed`; [`crate::jobs::queue_webhook`])
//! are signed as Replicate signs them, the Standard Webhooks way: headers
//! `webhook-id` (the delivery UUID, the same on retries),
//! `webhook-timestamp` (unix seconds of the attempt) and
//! `webhook-signature: v1,<base64 of HMAC-SHA256 of "<id>.<timestamp>.<body>">`
//! keyed with the API key's own secret ([`prediction_key`]: another key's
//! holder cannot forge them), which `GET /v1/webhooks/default/secret`
//! answers as `whsec_<base64>` ([`prediction_secret`]). Retries and backoff
//! are the same.
//!
//! Deliveries go through the outbound fetcher ([`crate::fetch`]): the URL
//! was checked at submission and is checked again at each delivery (DNS may
//! have changed); a refused address is never connected to and not retried.
//! Redirects are not followed.

use std::time::Duration;

use base64::Engine as _;
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

/// The prefix of the outbox event names of Replicate prediction webhooks
/// (`prediction.start`, `prediction.progress`, `prediction.completed`).
pub const PREDICTION_EVENT_PREFIX: &str = "prediction.";

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// The 32-byte key that signs API key `key_id`'s prediction webhooks:
/// HMAC-SHA256 of `"replicate-webhook-key:<key_id>"` keyed with the
/// server's webhook secret.
pub fn prediction_key(server_secret: &[u8], key_id: &str) -> Vec<u8> {
    hmac_sha256(
        server_secret,
        format!("replicate-webhook-key:{key_id}").as_bytes(),
    )
}

/// [`prediction_key`] as Replicate hands its signing secret out:
/// `whsec_` + standard base64.
pub fn prediction_secret(server_secret: &[u8], key_id: &str) -> String {
    let key = prediction_key(server_secret, key_id);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The Standard Webhooks `webhook-signature` of delivery `id` sent at unix
/// time `t`: `v1,` + base64 of HMAC-SHA256 of `"<id>.<t>.<body>"`.
pub fn standard_signature(key: &[u8], id: &str, t: i64, body: &str) -> String {
    let digest = hmac_sha256(key, format!("{id}.{t}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The delay before retry number `attempt` (1-based): `base_ms · 2^(attempt-1)`,
/// at most one hour.
pub fn backoff_ms(base_ms: u64, attempt: u32) -> u64 {
    let factor = 1u64 << attempt.saturating_sub(1).min(30);
    base_ms.saturating_mul(factor).min(3_600_000)
}

/// How a delivery is signed.
enum Signing {
    /// easel's envelope: `Easel-Signature` with the server's secret.
    Easel(Vec<u8>),
    /// A Replicate prediction: Standard Webhooks headers with the API
    /// key's [`prediction_key`].
    Standard(Vec<u8>),
}

/// POST one delivery through the outbound fetcher (blocking; run off the
/// async runtime). `Ok` on 2xx; an address the fetcher refuses is never
/// connected to.
fn post(
    fetcher: &Fetcher,
    delivery: &DeliveryRow,
    signing: &Signing,
    timeout: Duration,
) -> Result<(), FetchError> {
    let t = now_ms() / 1000;
    match signing {
        Signing::Easel(secret) => {
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
        Signing::Standard(key) => {
            let signature = standard_signature(key, &delivery.id, t, &delivery.payload);
            fetcher.post_json(
                &delivery.url,
                &[
                    ("webhook-id", &delivery.id),
                    ("webhook-timestamp", &t.to_string()),
                    ("webhook-signature", &signature),
                ],
                &delivery.payload,
                timeout,
            )
        }
    }
}

/// How `delivery` is signed: a prediction's with its API key's key (read
/// from its job, which is never deleted), any other with the server's
/// secret. `None` when the store cannot say now (tried again next round).
async fn signing_of(state: &AppState, delivery: &DeliveryRow, secret: &[u8]) -> Option<Signing> {
    if !delivery.event.starts_with(PREDICTION_EVENT_PREFIX) {
        return Some(Signing::Easel(secret.to_vec()));
    }
    match state.store().generation(&delivery.generation_id).await {
        Ok(g) => {
            let key_id = g.map(|g| g.key_id).unwrap_or_default();
            Some(Signing::Standard(prediction_key(secret, &key_id)))
        }
        Err(e) => {
            tracing::warn!("webhook outbox: {e}");
            None
        }
    }
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
        // Held for one request's timeout and a margin: a dispatcher that
        // dies mid-send leaves its claims to be sent again after that.
        let hold = timeout + Duration::from_secs(30);
        let (due, next) = match state.store().claim_due_deliveries(16, hold).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("webhook outbox: {e}");
                (Vec::new(), Some(now_ms() + 1000))
            }
        };
        let mut handles = Vec::new();
        for delivery in due {
            let Some(signing) = signing_of(&state, &delivery, &secret).await else {
                continue;
            };
            let fetcher = state.fetcher().clone();
            handles.push(tokio::task::spawn_blocking(move || {
                let result = post(&fetcher, &delivery, &signing, timeout);
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

    /// The example of the Standard Webhooks specification (which Replicate
    /// follows): its secret, message id, timestamp, payload and signature.
    #[test]
    fn standard_signatures_match_the_specification_example() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        assert_eq!(
            standard_signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                "{\"test\": 2432232314}"
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // Each API key gets its own key, in Replicate's `whsec_` form.
        let a = prediction_secret(b"server", "key-a");
        assert!(a.starts_with("whsec_"));
        assert_ne!(a, prediction_secret(b"server", "key-b"));
        assert_ne!(a, prediction_secret(b"other", "key-a"));
        assert_eq!(prediction_key(b"server", "key-a").len(), 32);
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
            let signing = Signing::Easel(b"k".to_vec());
            let e = post(&fetcher, &delivery, &signing, Duration::from_secs(2)).unwrap_err();
            assert!(!e.retryable(), "{e:?}");
        }
        assert!(fetcher.handed_out().is_empty());
        assert_eq!(
            listener.accept().map_err(|e| e.kind()).unwrap_err(),
            std::io::ErrorKind::WouldBlock
        );
    }
}
