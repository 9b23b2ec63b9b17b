//! A real PostgreSQL server for the tests (issue 18): Debian's `postgresql`
//! binaries (`initdb`, `pg_ctl`; found on PATH, under
//! `/usr/lib/postgresql/*/bin`, or in `EASEL_PG_BIN`), a throwaway cluster
//! in a temporary folder, listening on a free loopback port, trust
//! authentication, `fsync` off (a test cluster). Run as root (CI
//! containers), the cluster belongs to the `postgres` user (`initdb`
//! refuses root) and the commands run through `runuser`.
//!
//! Without the binaries [`PgServer::start`] prints a loud `SKIPPED` line
//! and returns `None`, unless `EASEL_REQUIRE_SERVERS=1` (CI), where it
//! panics.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

/// A running PostgreSQL cluster; stopped (immediately) on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    run_as: Option<&'static str>,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
}

fn find_bin() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("EASEL_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file());
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether missing servers fail the tests (`EASEL_REQUIRE_SERVERS=1`, set by CI).
pub fn servers_required() -> bool {
    std::env::var("EASEL_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

impl PgServer {
    /// Start a fresh cluster, or `None` (with a `SKIPPED` line naming
    /// `what`) when PostgreSQL is not installed and not required.
    pub fn start(what: &str) -> Option<PgServer> {
        let Some(bin) = find_bin() else {
            let message = format!(
                "SKIPPED {what}: PostgreSQL is not installed (no initdb/pg_ctl on PATH or under \
                 /usr/lib/postgresql; `apt-get install postgresql`, or set EASEL_PG_BIN)"
            );
            if servers_required() {
                panic!("{message}; EASEL_REQUIRE_SERVERS=1 makes this a failure");
            }
            // Straight to the process's stderr: libtest captures
            // `eprintln!` of a passing test, and this must be seen.
            let banner = format!("\n!!!!!!!! {message} !!!!!!!!\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes());
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("easel-pg-")
            .tempdir()
            .expect("a temporary folder");
        let run_as = (unsafe { libc::geteuid() } == 0).then_some("postgres");
        let server = PgServer {
            bin,
            dir,
            run_as,
            port: free_port(),
        };
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(server.dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the cluster folder to {user}");
        }
        server.run(
            "initdb",
            &[
                "-D",
                &server.data().to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "easel",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.start_again();
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command running PostgreSQL's `tool`, as the cluster's owner.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .expect("running a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start the cluster (again, after [`PgServer::stop`]) on its port.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    /// Stop the cluster at once (`-m immediate`: as a crash looks to clients).
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// The URL of a new, empty database on this server.
    pub async fn new_database(&self) -> String {
        let name = format!("easel_{}", uuid::Uuid::new_v4().simple());
        let admin = format!("postgres://easel@127.0.0.1:{}/postgres", self.port);
        let store = easel_server::store::Store::connect_unmigrated(&admin)
            .await
            .expect("connecting to the test cluster");
        store
            .execute_raw(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        store.close().await;
        format!("postgres://easel@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
