//! A real S3-protocol server for the asset-store tests: moto in server mode
//! (`moto_server` from PyPI's `moto[server]`; `source tools/moto-env.sh`
//! installs the pinned version and exports EASEL_MOTO_SERVER), started on
//! a free loopback port for one test and stopped when it is dropped.
//!
//! Without moto the test says so loudly on stderr and passes, unless
//! `EASEL_REQUIRE_SERVERS=1` (CI), where a missing server fails it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `moto_server`, killed on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

/// `moto_server`: EASEL_MOTO_SERVER, else the first on PATH.
fn find_moto() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("EASEL_MOTO_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "EASEL_MOTO_SERVER={} is not a file",
            path.display()
        );
        return Some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

/// Whether the servers the tests use must be there (`EASEL_REQUIRE_SERVERS=1`).
fn required() -> bool {
    std::env::var("EASEL_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

impl Moto {
    /// Start moto for `test`; `None` (after a SKIPPED line on stderr) when
    /// it is not installed and not required.
    ///
    /// # Panics
    /// When it is required and missing, or does not come up in 60 s.
    pub fn start(test: &str) -> Option<Moto> {
        let Some(program) = find_moto() else {
            assert!(
                !required(),
                "{test}: EASEL_REQUIRE_SERVERS=1 but there is no moto_server: \
                 `source tools/moto-env.sh` (or set EASEL_MOTO_SERVER)"
            );
            // Straight to the process's stderr: libtest captures
            // `eprintln!` of a passing test, and this must be seen.
            let banner = format!(
                "\n**********************************************************************\n\
                 SKIPPED {test}: no S3 test server (moto_server not found).\n\
                 Run `source tools/moto-env.sh` first (or set EASEL_MOTO_SERVER);\n\
                 EASEL_REQUIRE_SERVERS=1 makes this a failure.\n\
                 **********************************************************************\n"
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes());
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut command = Command::new(&program);
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // If the test process dies without dropping this, moto follows.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: cannot start {}: {e}", program.display()));
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("{test}: {} exited at start: {status}", program.display());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && ureq::get(&format!("{}/", moto.endpoint)).call().is_ok()
            {
                return Some(moto);
            }
            assert!(
                Instant::now() < deadline,
                "{test}: moto_server did not answer on {} in 60 s",
                moto.endpoint
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Create `bucket` (moto checks no signature).
    pub fn create_bucket(&self, bucket: &str) {
        ureq::put(&format!("{}/{bucket}", self.endpoint))
            .call()
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
    }

    /// object_store S3 settings for this server (the config's `s3` table).
    pub fn s3_options(&self) -> BTreeMap<String, String> {
        [
            ("endpoint", self.endpoint.as_str()),
            ("region", "us-east-1"),
            ("access_key_id", "testing"),
            ("secret_access_key", "testing"),
            ("allow_http", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
