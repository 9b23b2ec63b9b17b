//! What the tests that start `easel` processes share: the fixtures, a free
//! loopback port, and waiting for a server's `/readyz`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A TCP port on 127.0.0.1 free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait (60 s at most) until `base`/readyz answers; `what` names the
/// process in the failure.
pub fn wait_ready(base: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&format!("{base}/readyz")).call().is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}
