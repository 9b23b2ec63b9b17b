//! The web page for people (issue 17): `/` and its files under `/ui/`,
//! embedded in the binary (no network, no build step: plain ES modules
//! and CSS in `crates/easel-server/ui/`). The page is public, like `/docs`;
//! it asks for an API key and calls the public `/v1` API with it.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The page's files: `(name under /ui/, content type, bytes)`.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../ui/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/style.css"),
    ),
    ("main.js", JS, include_str!("../../ui/main.js")),
    ("api.js", JS, include_str!("../../ui/api.js")),
    ("dom.js", JS, include_str!("../../ui/dom.js")),
    ("generate.js", JS, include_str!("../../ui/generate.js")),
    ("jobs.js", JS, include_str!("../../ui/jobs.js")),
    ("gallery.js", JS, include_str!("../../ui/gallery.js")),
    ("mask.js", JS, include_str!("../../ui/mask.js")),
    ("pnginfo.js", JS, include_str!("../../ui/pnginfo.js")),
    ("usage.js", JS, include_str!("../../ui/usage.js")),
    ("flows.js", JS, include_str!("../../ui/flows.js")),
];

const JS: &str = "text/javascript; charset=utf-8";

/// What the page may load: its own files and API, images from anywhere a
/// `file_url` points (`public_url` may name another origin), no inline script.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob: http: https:; \
    script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

fn file(name: &str) -> Option<Response> {
    let (_, mime, body) = FILES.iter().find(|(n, _, _)| *n == name)?;
    let mut response = (*body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    // Files change with the binary: revalidate rather than cache for long.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(response)
}

/// `GET /`: the page.
pub async fn index() -> Response {
    file("index.html").unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
}

/// `GET /ui/{name}`: one of the page's files, or 404.
pub async fn ui_file(Path(name): Path<String>) -> Result<Response, ApiError> {
    file(&name).ok_or_else(|| ApiError::not_found("file", &name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_served() {
        // A module imported by another (`from './x.js'`) but missing from
        // FILES would 404 in the browser only.
        for (_, _, body) in FILES {
            for part in body.split("from './").skip(1) {
                let name = part.split('\'').next().unwrap();
                assert!(
                    FILES.iter().any(|(n, _, _)| *n == name),
                    "{name} is imported but not served"
                );
            }
        }
        assert!(file("index.html").is_some());
        assert!(file("../Cargo.toml").is_none());
    }
}
