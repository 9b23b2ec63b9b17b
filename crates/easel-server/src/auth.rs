//! API keys: `Authorization: Bearer esk_…` (also `Token esk_…`, the
//! scheme older Replicate clients send). On AUTOMATIC1111's routes
//! (`/sdapi/...`), HTTP Basic too, with the key as the password and any
//! user name (what `--api-auth user:pass` clients send).
//!
//! A key's secret is shown once, when created (`easel keys create`); the
//! store keeps only its SHA-256. Every job, asset, training, pack and ledger
//! entry belongs to the key that made it, and a key sees only its own. With
//! `no_auth` (loopback only) every request acts as the built-in key `local`.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::store::{KeyRow, Store};
use crate::util::now_ms;
use crate::AppState;

/// The key id used for every request when auth is off.
pub const LOCAL_KEY_ID: &str = "local";
/// The prefix of every secret.
pub const SECRET_PREFIX: &str = "esk_";

/// Who is calling: the key id and its credit limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id (`local` without auth).
    pub key_id: String,
    /// Credit limit in micro-USD, if any.
    pub credit_limit_micros: Option<i64>,
}

/// SHA-256 of a secret, hex.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new key: its row and its secret (shown once).
pub fn new_key(name: &str, credit_limit_micros: Option<i64>) -> (KeyRow, String) {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let secret = format!("{SECRET_PREFIX}{body}");
    let id = format!("key_{:016x}", rng.random::<u64>());
    let row = KeyRow {
        id,
        name: name.to_string(),
        prefix: secret[..SECRET_PREFIX.len() + 6].to_string(),
        credit_limit_micros,
        created_at: now_ms(),
        revoked_at: None,
    };
    (row, secret)
}

/// Create a key in the store of `data_dir` (creating the store if needed):
/// what `easel keys create` does. Returns the row and the secret.
///
/// # Errors
/// The store cannot be opened or written.
pub async fn create_key(
    data_dir: &Path,
    name: &str,
    credit_limit_usd: Option<f64>,
) -> Result<(KeyRow, String), crate::store::StoreError> {
    std::fs::create_dir_all(data_dir)?;
    create_key_at(&crate::store::sqlite_url(data_dir), name, credit_limit_usd).await
}

/// Create a key in the store at `database_url` (`sqlite://...` or
/// `postgres://...`, migrated if needed). Returns the row and the secret.
///
/// # Errors
/// The store cannot be opened or written.
pub async fn create_key_at(
    database_url: &str,
    name: &str,
    credit_limit_usd: Option<f64>,
) -> Result<(KeyRow, String), crate::store::StoreError> {
    let store = Store::connect(database_url).await?;
    let (row, secret) = new_key(name, credit_limit_usd.map(|u| (u * 1e6).round() as i64));
    store.insert_key(&row, &hash_secret(&secret)).await?;
    Ok((row, secret))
}

/// The middleware: resolve the bearer key into a [`Principal`] request
/// extension, or answer 401.
pub async fn require_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.config().no_auth {
        request.extensions_mut().insert(Principal {
            key_id: LOCAL_KEY_ID.into(),
            credit_limit_micros: None,
        });
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let Some(header) = header else {
        return ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (create one with `easel keys create`)",
        )
        .into_response();
    };
    let basic_allowed = request.uri().path().starts_with("/sdapi/");
    let secret = match header.split_once(' ') {
        Some((scheme, secret))
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") =>
        {
            secret.trim().to_string()
        }
        Some((scheme, credentials)) if basic_allowed && scheme.eq_ignore_ascii_case("basic") => {
            match basic_password(credentials) {
                Some(password) => password,
                None => return ApiError::unauthorized(
                    "the Basic credentials are not base64 of `user:password`; send the API key \
                         as the password (any user name) or `Authorization: Bearer <key>`",
                )
                .into_response(),
            }
        }
        _ if basic_allowed => return ApiError::unauthorized(
            "the Authorization header must be `Bearer <key>` or Basic with the key as the password",
        )
        .into_response(),
        _ => {
            return ApiError::unauthorized(
                "the Authorization header must be `Bearer <key>` (or `Token <key>`)",
            )
            .into_response()
        }
    };
    match state.store().key_by_hash(&hash_secret(&secret)).await {
        Ok(Some(key)) => {
            request.extensions_mut().insert(Principal {
                key_id: key.id,
                credit_limit_micros: key.credit_limit_micros,
            });
            next.run(request).await
        }
        Ok(None) => ApiError::unauthorized("invalid or revoked API key").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The password of HTTP Basic `credentials` (base64 of `user:password`,
/// RFC 7617), or `None` when they are not that.
pub fn basic_password(credentials: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_hashed() {
        let (a, sa) = new_key("a", None);
        let (b, sb) = new_key("b", Some(1_000_000));
        assert_ne!(sa, sb);
        assert_ne!(a.id, b.id);
        assert!(sa.starts_with(SECRET_PREFIX));
        assert!(sa.starts_with(&a.prefix));
        assert_eq!(hash_secret(&sa).len(), 64);
        assert_ne!(hash_secret(&sa), hash_secret(&sb));
    }

    #[test]
    fn basic_credentials_give_the_password() {
        // base64("webui:esk_abc:def") - the password may hold colons.
        assert_eq!(
            basic_password("d2VidWk6ZXNrX2FiYzpkZWY=").as_deref(),
            Some("esk_abc:def")
        );
        assert_eq!(basic_password("not base64!"), None);
        // base64("no-colon")
        assert_eq!(basic_password("bm8tY29sb24="), None);
    }
}
