//! The listener: the accept loop, the connection cap and the per-connection
//! timeouts in front of the router (finding 3 of issue 12: slow clients).
//!
//! Each accepted TCP connection is served by hyper's HTTP/1 connection
//! (`hyper::server::conn::http1`) with the router as its service, watched by
//! a per-connection clock:
//!
//! - **Header read timeout** (`header_read_timeout_seconds`): a new
//!   connection must deliver a complete request head within this time of
//!   being accepted, and a kept-alive connection within this time of the
//!   first byte of its next request. Otherwise it is closed without an
//!   answer (the slowloris defence).
//! - **Idle timeout** (`idle_timeout_seconds`): a kept-alive connection
//!   with no request in flight and no byte of a new one is closed this long
//!   after its last response ended.
//! - **Body read timeout** (`body_read_timeout_seconds`): a request body
//!   must be received completely within this time of the request head;
//!   past it, reading the body fails and the handler answers 400
//!   `bad_request` (through the usual body error path), then the connection
//!   is closed.
//!
//! None of these runs while a response is in flight: an SSE stream or a
//! `Prefer: wait` response may last as long as its handler wants.
//!
//! **Connection cap** (`max_connections`): at most this many connections
//! are served at once. At the cap, an accepted connection waits up to
//! [`CAP_WAIT`] for a slot and is then closed; further connections wait in
//! the kernel's listen backlog. The cap is kept below the process's open
//! file limit (`RLIMIT_NOFILE`, minus [`RESERVED_FDS`] for the store, model
//! files and outbound requests): the soft limit is raised toward the hard
//! limit when needed, and when that is not enough the cap is lowered with a
//! warning in the log, never silently.
//!
//! Graceful shutdown: when the shutdown future completes, the loop stops
//! accepting, every connection is asked to finish (idle ones close at once,
//! in-flight requests complete), and [`serve_on`] returns once all are
//! closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::AppState;

/// How long an accepted connection waits for a free slot when
/// `max_connections` are open before it is closed.
pub const CAP_WAIT: Duration = Duration::from_millis(250);

/// File descriptors kept free for everything but client connections (the
/// SQLite store, model and asset files, webhooks and image fetches).
pub const RESERVED_FDS: u64 = 256;

/// The timeouts and the cap the listener applies (from [`crate::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to receive a complete request head.
    pub header_read: Duration,
    /// Time to receive a complete request body, from its head.
    pub body_read: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Limits {
    /// The limits `state`'s configuration sets (the cap not yet checked
    /// against the file limit; see [`effective_max_connections`]).
    pub fn from_config(config: &crate::Config) -> Limits {
        Limits {
            header_read: Duration::from_secs(config.header_read_timeout_seconds),
            body_read: Duration::from_secs(config.body_read_timeout_seconds),
            idle: Duration::from_secs(config.idle_timeout_seconds),
            max_connections: config.max_connections,
        }
    }
}

/// `wanted` connections, or fewer when the open file limit cannot hold them
/// plus [`RESERVED_FDS`]. Raises the soft `RLIMIT_NOFILE` toward the hard
/// limit when that is enough (logged); lowers the cap otherwise, with a
/// warning on stderr and in the log.
pub fn effective_max_connections(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let needed = wanted as u64 + RESERVED_FDS;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return wanted;
        }
        let soft = lim.rlim_cur as u64;
        if lim.rlim_cur == libc::RLIM_INFINITY || soft >= needed {
            return wanted;
        }
        let hard = lim.rlim_max as u64;
        let target = if lim.rlim_max == libc::RLIM_INFINITY {
            needed
        } else {
            needed.min(hard)
        };
        let raised = libc::rlimit {
            rlim_cur: target as libc::rlim_t,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        let soft = if target > soft && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0
        {
            tracing::info!("raised the open file limit (RLIMIT_NOFILE) from {soft} to {target} for max_connections = {wanted}");
            target
        } else {
            soft
        };
        if soft >= needed {
            return wanted;
        }
        let cap = (soft.saturating_sub(RESERVED_FDS) as usize).max(1);
        let message = format!(
            "max_connections = {wanted} needs {needed} open files but the limit (RLIMIT_NOFILE) \
             is {soft} (hard {hard}); serving at most {cap} connections. Raise the limit \
             (`ulimit -n`, LimitNOFILE=) or lower max_connections"
        );
        tracing::warn!("{message}");
        eprintln!("easel serve: warning: {message}");
        cap
    }
    #[cfg(not(unix))]
    {
        wanted
    }
}

/// Serve `state`'s router on `listener` with the configured timeouts and
/// connection cap until `shutdown` completes; then stop accepting, let
/// in-flight requests finish and return once every connection is closed.
/// Does not call [`AppState::shutdown`] (the caller does, after).
///
/// # Errors
/// None today: accept errors (e.g. `EMFILE`) are logged and retried after a
/// short pause. The `Result` leaves room for bind-time failures.
pub async fn serve_on(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut limits = Limits::from_config(state.config());
    limits.max_connections = effective_max_connections(limits.max_connections);
    serve_with_limits(listener, crate::app(state), limits, shutdown).await
}

/// [`serve_on`] with explicit `limits` (`max_connections` at most
/// 1000000, as [`crate::Config::check`] ensures) and router.
async fn serve_with_limits(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let at_cap_logged = AtomicBool::new(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (stream, _peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE/ECONNABORTED: pause instead of spinning.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !at_cap_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "max_connections ({max}) connections are open; new connections \
                         wait up to {CAP_WAIT:?} for a slot, then are closed"
                    );
                }
                match tokio::time::timeout(CAP_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        if slots.available_permits() > max / 2 {
            at_cap_logged.store(false, Ordering::Relaxed);
        }
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            serve_connection(stream, router, limits, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it is closed.
    let _ = slots.acquire_many(max as u32).await;
    Ok(())
}

/// What a connection's clock knows.
#[derive(Debug)]
struct ClockState {
    /// Requests whose response has not ended.
    in_flight: usize,
    /// When the connection last became idle (accepted, or a response ended).
    idle_since: Instant,
    /// Whether it has served a request (then idle waits use `idle`, not
    /// `header_read`, until a byte arrives).
    served: bool,
    /// The first byte of a request head arrived at this time.
    head_started: Option<Instant>,
}

/// Shared by the IO wrapper, the service and the watchdog of a connection.
struct Clock {
    state: Mutex<ClockState>,
    changed: Notify,
    limits: Limits,
}

impl Clock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the connection must be closed, or `None` while a request is in
    /// flight.
    fn deadline(&self) -> Option<Instant> {
        let s = self.lock();
        if s.in_flight > 0 {
            return None;
        }
        Some(match s.head_started {
            Some(t) => t + self.limits.header_read,
            None if s.served => s.idle_since + self.limits.idle,
            None => s.idle_since + self.limits.header_read,
        })
    }

    fn bytes_read(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        let mut s = self.lock();
        s.in_flight += 1;
        s.head_started = None;
        drop(s);
        self.changed.notify_one();
    }

    fn response_ended(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            s.served = true;
            s.head_started = None;
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Completes when the connection has outlived its deadline.
    async fn expired(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline() {
                None => changed.await,
                Some(deadline) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let clock = Arc::new(Clock {
        state: Mutex::new(ClockState {
            in_flight: 0,
            idle_since: Instant::now(),
            served: false,
            head_started: None,
        }),
        changed: Notify::new(),
        limits,
    });
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        clock: clock.clone(),
    });
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let clock = service_clock.clone();
        let router = router.clone();
        async move {
            clock.request_started();
            let guard = InFlight(clock);
            let deadline = Instant::now() + limits.body_read;
            let request = request.map(|body| {
                Body::new(DeadlineBody {
                    inner: body,
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    limit: limits.body_read,
                })
            });
            let response = router.oneshot(request).await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(GuardedBody {
                    inner: body,
                    _guard: guard,
                })
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The clock above does the header timeout (hyper's own would also cut
    // idle keep-alive waits at the header timeout).
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = clock.expired() => {
                tracing::debug!("closing a connection that outlived its header or idle timeout");
                return;
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The TCP stream, telling the clock when request bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        result
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks a request in flight until its response body is dropped (sent,
/// or the connection closed).
struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.response_ended();
    }
}

/// A response body that keeps its request in flight while it lives.
struct GuardedBody {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body read timeout's error.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within {0:?} (body_read_timeout_seconds)")]
pub struct BodyTimeout(Duration);

/// A request body that fails once its deadline passes before its end.
struct DeadlineBody {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl HttpBody for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyTimeout(self.limit).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
