//! The outbound fetcher: the one way the service follows a URL a client gave
//! it (`image` / `mask` inputs, LoRA downloads, webhook deliveries). The
//! operator's own `llm_url` does not go through it.
//!
//! Rules, in order, for every hop of a request:
//!
//! 1. the URL is `http` or `https` with a host (the `url` crate, following
//!    the WHATWG URL standard, normalises numeric IPv4 spellings such as
//!    `http://2130706433/` to `127.0.0.1`);
//! 2. the host is resolved once (an IP literal is taken as is) and **every**
//!    resolved address must be a public unicast address (see
//!    [`is_forbidden`]), unless the host name or the address is in the
//!    operator's allow-list (`allow_fetch_hosts`);
//! 3. the connection is made to those checked addresses only: the checks run
//!    inside ureq's [`ureq::Resolver`], which is the only source of the
//!    addresses ureq connects to, so there is no second resolution;
//! 4. redirects are followed by hand, at most [`MAX_REDIRECTS`], each hop
//!    going through 1–3 again;
//! 5. the whole exchange has one deadline and the body a byte cap.
//!
//! Every refusal and failure shows the client the same text
//! ([`FETCH_FAILED`]), so the fetcher cannot be used to tell an open port
//! from a closed one or a refused address from an unreachable one; the
//! reason goes to the server log (`debug`/`info`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most redirects followed by one fetch.
pub const MAX_REDIRECTS: usize = 3;

/// The one message a client sees for any refused or failed fetch.
pub const FETCH_FAILED: &str =
    "the URL could not be fetched (refused by this server's outbound policy, unreachable, \
     or not answered with a 2xx); see the server log for the reason";

/// Name resolution, pluggable so tests can answer without DNS.
pub trait Dns: Send + Sync {
    /// The addresses of host name `host` (never an IP literal) at `port`.
    ///
    /// # Errors
    /// When the name does not resolve.
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// How long [`SystemDns`] waits for a name to resolve. `getaddrinfo` has no
/// timeout of its own, so a slow resolver would otherwise hold the fetch (and
/// a submission's webhook check) past every other deadline.
pub const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The system resolver (`getaddrinfo`), given up after [`DNS_TIMEOUT`]: the
/// lookup runs on a helper thread, which is left to finish on its own when
/// the wait times out.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemDns;

impl Dns for SystemDns {
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let name = host.to_string();
        std::thread::Builder::new()
            .name("easel-dns".into())
            .spawn(move || {
                let result = (name.as_str(), port)
                    .to_socket_addrs()
                    .map(Iterator::collect::<Vec<_>>);
                let _ = tx.send(result);
            })?;
        match rx.recv_timeout(DNS_TIMEOUT) {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("resolving {host} took longer than {DNS_TIMEOUT:?}"),
            )),
        }
    }
}

/// The operator's exceptions (`allow_fetch_hosts`): CIDR blocks (a bare
/// address is a /32 or /128) and host names (matched exactly, case-insensitively,
/// against the URL's host; a name's addresses are then not checked).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    nets: Vec<ipnet::IpNet>,
    hosts: Vec<String>,
}

impl AllowList {
    /// Parse entries: `10.0.0.0/8`, `192.168.1.5`, `::1`, `fd00::/8`,
    /// `models.internal`.
    ///
    /// # Errors
    /// The first entry that is neither a CIDR, an address, nor a host name.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for entry in entries {
            let e = entry.as_ref().trim();
            let bare = e.trim_start_matches('[').trim_end_matches(']');
            if let Ok(net) = e.parse::<ipnet::IpNet>() {
                list.nets.push(net.trunc());
            } else if let Ok(ip) = bare.parse::<IpAddr>() {
                list.nets.push(ipnet::IpNet::from(ip));
            } else if !e.is_empty()
                && e.len() <= 253
                && e.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
            {
                list.hosts.push(e.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "`{e}` is not a CIDR block (10.0.0.0/8, fd00::/8), an IP address, \
                     or a host name"
                ));
            }
        }
        Ok(list)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|h| *h == host)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// Whether `ip` is not a public unicast address, so the fetcher must not
/// connect to it: loopback, unspecified, private (RFC 1918, RFC 4193),
/// link-local, CGNAT (RFC 6598), multicast, broadcast, "this network"
/// (0/8), IETF protocol assignments (192.0.0/24, 2001::/23 with Teredo),
/// documentation (RFC 5737, RFC 3849, RFC 9637), benchmarking (198.18/15,
/// 2001:2::/48 lies in 2001::/23), reserved (240/4), the 6to4 relay anycast
/// (192.88.99/24), discard-only (100::/64), site-local (fec0::/10) and
/// everything outside global unicast 2000::/3. IPv6 forms that embed an IPv4
/// address (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that IPv4 address;
/// local-use NAT64 (64:ff9b:1::/48) is refused. Follows the IANA IPv4 and
/// IPv6 Special-Purpose Address Registries (RFC 6890).
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => v6_forbidden(v6),
    }
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // "this network", includes 0.0.0.0
        || a == 10
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || a == 127
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 192 && b == 168)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224 // multicast 224/4, reserved 240/4, broadcast
}

fn v6_forbidden(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, also :: and ::1).
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        if s[5] == 0 && s[6] == 0 {
            return true; // ::, ::1 and ::0.0.x.x
        }
        return v4_forbidden(embedded(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_forbidden(embedded(s[6], s[7]));
    }
    // 6to4 2002:V4ADDR::/48.
    if s[0] == 0x2002 {
        return v4_forbidden(embedded(s[1], s[2]));
    }
    // Only global unicast 2000::/3 remains allowed.
    if s[0] & 0xe000 != 0x2000 {
        return true; // ULA fc00::/7, link-local fe80::/10, multicast ff00::/8, 64:ff9b:1::/48, 100::/64...
    }
    (s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments 2001::/23 (Teredo, benchmarking)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
        || (s[0] & 0xfff0 == 0x3ff0) // documentation 3fff::/20
}

/// Why a fetch did not succeed (the detail is for the log; the client sees
/// [`FETCH_FAILED`] for all but [`FetchErrorKind::TooLarge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// The URL or an address it resolved to is not allowed (not retryable).
    Refused,
    /// The body is larger than the cap (bytes).
    TooLarge(u64),
    /// Any other failure: DNS, connect, TLS, timeout, non-2xx, too many
    /// redirects.
    Failed,
}

/// A refused or failed fetch.
#[derive(Debug, Clone)]
pub struct FetchError {
    /// What went wrong.
    pub kind: FetchErrorKind,
    /// The reason, for the server log only.
    pub detail: String,
}

impl FetchError {
    fn refused(detail: impl Into<String>) -> Self {
        Self {
            kind: FetchErrorKind::Refused,
            detail: detail.into(),
        }
    }
    fn failed(detail: impl Into<String>) -> Self {
        Self {
            kind: FetchErrorKind::Failed,
            detail: detail.into(),
        }
    }
    /// Whether trying again later could help (not for refusals).
    pub fn retryable(&self) -> bool {
        self.kind == FetchErrorKind::Failed
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FetchErrorKind::TooLarge(limit) => {
                write!(
                    f,
                    "the URL's content is larger than the limit of {limit} bytes"
                )
            }
            _ => f.write_str(FETCH_FAILED),
        }
    }
}

impl std::error::Error for FetchError {}

/// The outbound fetcher. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    allow: Arc<AllowList>,
    dns: Arc<dyn Dns>,
    handed_out: Option<Arc<Mutex<Vec<SocketAddr>>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("allow", &self.allow)
            .finish()
    }
}

impl Fetcher {
    /// A fetcher with the system resolver and `allow` as exceptions.
    pub fn new(allow: AllowList) -> Self {
        Self {
            allow: Arc::new(allow),
            dns: Arc::new(SystemDns),
            handed_out: None,
        }
    }

    /// The same fetcher with another resolver (tests).
    pub fn with_dns(mut self, dns: Arc<dyn Dns>) -> Self {
        self.dns = dns;
        self
    }

    /// The same fetcher, recording every address it hands to the HTTP client
    /// (the only addresses a connection can be made to); see
    /// [`Fetcher::handed_out`].
    pub fn recording(mut self) -> Self {
        self.handed_out = Some(Arc::default());
        self
    }

    /// The addresses handed to the HTTP client so far (recording fetchers).
    pub fn handed_out(&self) -> Vec<SocketAddr> {
        self.handed_out
            .as_ref()
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Parse `url` and check it (scheme, host, resolved addresses) without
    /// connecting. Blocking (DNS): call off the async runtime.
    ///
    /// # Errors
    /// [`FetchErrorKind::Refused`] for a non-http(s) URL or a forbidden
    /// address, [`FetchErrorKind::Failed`] when the name does not resolve.
    pub fn check_url(&self, url: &str) -> Result<(), FetchError> {
        let parsed = parse_url(url)?;
        let host = parsed.host_str().unwrap_or_default().to_string();
        let port = parsed.port_or_known_default().unwrap_or(80);
        self.resolve_checked(&host, port).map(|_| ())
    }

    /// Resolve `host` (a name, or an IP literal with or without brackets)
    /// and check every address.
    fn resolve_checked(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, FetchError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => self
                .dns
                .lookup(bare, port)
                .map_err(|e| FetchError::failed(format!("resolving {bare}: {e}")))?,
        };
        if addrs.is_empty() {
            return Err(FetchError::failed(format!("{bare} has no address")));
        }
        if !self.allow.allows_host(bare) {
            if let Some(bad) = addrs
                .iter()
                .find(|a| is_forbidden(a.ip()) && !self.allow.allows_ip(a.ip()))
            {
                return Err(FetchError::refused(format!(
                    "{bare} resolves to {}, which is not a public address \
                     (allow it with allow_fetch_hosts)",
                    bad.ip()
                )));
            }
        }
        Ok(addrs)
    }

    /// An agent whose resolver checks every address and notes a refusal.
    fn agent(&self, timeout: Duration, refusal: Arc<Mutex<Option<FetchError>>>) -> ureq::Agent {
        let this = self.clone();
        ureq::AgentBuilder::new()
            .timeout(timeout)
            .redirects(0)
            .user_agent(concat!("easel/", env!("CARGO_PKG_VERSION")))
            .resolver(move |netloc: &str| -> io::Result<Vec<SocketAddr>> {
                let (host, port) = split_netloc(netloc)
                    .ok_or_else(|| io::Error::other(format!("bad address {netloc}")))?;
                match this.resolve_checked(host, port) {
                    Ok(addrs) => {
                        if let Some(log) = &this.handed_out {
                            log.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .extend(addrs.iter().copied());
                        }
                        Ok(addrs)
                    }
                    Err(e) => {
                        let message = e.detail.clone();
                        *refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        Err(io::Error::new(io::ErrorKind::PermissionDenied, message))
                    }
                }
            })
            .build()
    }

    /// `GET url`, following at most [`MAX_REDIRECTS`] redirects, and write the
    /// body (at most `limit` bytes) to `out`; the whole exchange must end
    /// within `timeout`. Blocking: call off the async runtime.
    ///
    /// # Errors
    /// See [`FetchErrorKind`]; on `TooLarge` `out` holds a partial body.
    pub fn get_into(
        &self,
        url: &str,
        limit: u64,
        timeout: Duration,
        out: &mut dyn Write,
    ) -> Result<u64, FetchError> {
        let deadline = Instant::now() + timeout;
        let mut current = parse_url(url)?;
        for hop in 0..=MAX_REDIRECTS {
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| FetchError::failed("timed out"))?;
            let refusal = Arc::default();
            let agent = self.agent(remaining, Arc::clone(&refusal));
            let result = agent.request_url("GET", &current).call();
            let response = match result {
                Ok(r) => r,
                Err(e) => return Err(take_refusal(&refusal).unwrap_or_else(|| describe(e))),
            };
            if (300..400).contains(&response.status()) {
                let location = response
                    .header("location")
                    .ok_or_else(|| FetchError::failed("a redirect without Location"))?;
                let next = current
                    .join(location)
                    .map_err(|e| FetchError::failed(format!("bad redirect {location}: {e}")))?;
                if hop == MAX_REDIRECTS {
                    return Err(FetchError::failed(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    )));
                }
                tracing::debug!("fetch: {current} redirects to {next}");
                current = check_scheme(next)?;
                continue;
            }
            if let Some(len) = response
                .header("content-length")
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                if len > limit {
                    return Err(FetchError {
                        kind: FetchErrorKind::TooLarge(limit),
                        detail: format!("{current}: Content-Length {len} > {limit}"),
                    });
                }
            }
            let mut reader = response.into_reader().take(limit + 1);
            let copied = io::copy(&mut reader, out)
                .map_err(|e| FetchError::failed(format!("reading {current}: {e}")))?;
            if copied > limit {
                return Err(FetchError {
                    kind: FetchErrorKind::TooLarge(limit),
                    detail: format!("{current}: body over {limit} bytes"),
                });
            }
            return Ok(copied);
        }
        Err(FetchError::failed("too many redirects"))
    }

    /// [`Fetcher::get_into`] into memory.
    ///
    /// # Errors
    /// As [`Fetcher::get_into`].
    pub fn get(&self, url: &str, limit: u64, timeout: Duration) -> Result<Vec<u8>, FetchError> {
        let mut bytes = Vec::new();
        self.get_into(url, limit, timeout, &mut bytes)?;
        Ok(bytes)
    }

    /// `POST` a JSON `body` with extra `headers` to `url`, not following
    /// redirects; `Ok` on a 2xx answer. Blocking: call off the async runtime.
    ///
    /// # Errors
    /// See [`FetchErrorKind`] (a 3xx answer is a failure).
    pub fn post_json(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
        timeout: Duration,
    ) -> Result<(), FetchError> {
        let parsed = parse_url(url)?;
        let refusal = Arc::default();
        let agent = self.agent(timeout, Arc::clone(&refusal));
        let mut request = agent
            .request_url("POST", &parsed)
            .set("Content-Type", "application/json");
        for (name, value) in headers {
            request = request.set(name, value);
        }
        match request.send_string(body) {
            Ok(r) if (200..300).contains(&r.status()) => Ok(()),
            Ok(r) => Err(FetchError::failed(format!("HTTP {}", r.status()))),
            Err(e) => Err(take_refusal(&refusal).unwrap_or_else(|| describe(e))),
        }
    }
}

fn take_refusal(slot: &Arc<Mutex<Option<FetchError>>>) -> Option<FetchError> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn describe(e: ureq::Error) -> FetchError {
    match e {
        ureq::Error::Status(code, _) => FetchError::failed(format!("HTTP {code}")),
        other => FetchError::failed(other.to_string()),
    }
}

fn check_scheme(url: url::Url) -> Result<url::Url, FetchError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::refused(format!(
            "{url}: only http and https are fetched"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FetchError::refused(format!("{url}: no host")));
    }
    Ok(url)
}

fn parse_url(url: &str) -> Result<url::Url, FetchError> {
    let parsed =
        url::Url::parse(url.trim()).map_err(|e| FetchError::refused(format!("{url}: {e}")))?;
    check_scheme(parsed)
}

/// `host:port` (`[v6]:port` too) as ureq hands it to the resolver.
fn split_netloc(netloc: &str) -> Option<(&str, u16)> {
    let (host, port) = netloc.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn v(ip: &str) -> bool {
        is_forbidden(ip.parse().unwrap())
    }

    #[test]
    fn classifier_refuses_non_global_addresses() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::ffff:0:0",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "3fff::1",
        ] {
            assert!(v(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn classifier_allows_public_addresses() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2606:4700::1111",
            "2a00:1450::1",
        ] {
            assert!(!v(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn allow_list_parses_cidrs_addresses_and_names() {
        let list =
            AllowList::parse(&["127.0.0.1", "10.0.0.0/8", "[::1]", "Models.Internal"]).unwrap();
        assert!(list.allows_ip("127.0.0.1".parse().unwrap()));
        assert!(!list.allows_ip("127.0.0.2".parse().unwrap()));
        assert!(list.allows_ip("10.9.8.7".parse().unwrap()));
        assert!(list.allows_ip("::1".parse().unwrap()));
        assert!(list.allows_host("models.internal."));
        let e = AllowList::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("10.0.0.0/33"), "{e}");
        assert!(AllowList::parse(&["http://x"]).is_err());
    }

    /// A resolver that answers from a table and never touches the network.
    struct StubDns(HashMap<&'static str, Vec<IpAddr>>);

    impl Dns for StubDns {
        fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            self.0
                .get(host)
                .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        }
    }

    fn stub_fetcher(allow: &[&str]) -> Fetcher {
        let mut table = HashMap::new();
        table.insert("metadata.test", vec!["169.254.169.254".parse().unwrap()]);
        table.insert(
            "mixed.test",
            vec!["8.8.8.8".parse().unwrap(), "10.0.0.1".parse().unwrap()],
        );
        table.insert("localhost", vec!["127.0.0.1".parse().unwrap()]);
        Fetcher::new(AllowList::parse(allow).unwrap())
            .with_dns(Arc::new(StubDns(table)))
            .recording()
    }

    #[test]
    fn finding_1_ssrf_metadata_address_is_refused_before_any_connect() {
        let fetcher = stub_fetcher(&[]);
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://metadata.test/latest/meta-data/",
            "http://[::ffff:169.254.169.254]/",
            "http://[fe80::1]/",
            "http://mixed.test/",
            "http://0x7f.1/",
            "http://2130706433/",
            "http://[::1]:1/",
            "http://localhost:1/",
        ] {
            let e = fetcher.get(url, 1000, Duration::from_secs(2)).unwrap_err();
            assert_eq!(e.kind, FetchErrorKind::Refused, "{url}: {e:?}");
            assert_eq!(e.to_string(), FETCH_FAILED);
            let e = fetcher.check_url(url).unwrap_err();
            assert_eq!(e.kind, FetchErrorKind::Refused, "{url}: {e:?}");
        }
        assert!(
            fetcher.handed_out().is_empty(),
            "{:?}",
            fetcher.handed_out()
        );
    }

    #[test]
    fn other_schemes_and_unknown_names_fail_with_the_same_text() {
        let fetcher = stub_fetcher(&[]);
        for url in [
            "file:///etc/passwd",
            "ftp://x/y",
            "gopher://a/",
            "nope.test",
        ] {
            let e = fetcher.get(url, 10, Duration::from_secs(1)).unwrap_err();
            assert_eq!(e.kind, FetchErrorKind::Refused, "{url}");
            assert_eq!(e.to_string(), FETCH_FAILED);
        }
        let e = fetcher
            .get("http://unknown.test/", 10, Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Failed);
        assert_eq!(e.to_string(), FETCH_FAILED);
        assert!(fetcher.handed_out().is_empty());
    }

    /// A small HTTP server on 127.0.0.1 answering each connection with the
    /// next canned response (built from its port); returns the port.
    fn serve_with(responses: impl FnOnce(u16) -> Vec<String>) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let responses = responses(port);
        std::thread::spawn(move || {
            for response in responses {
                let Ok((mut socket, _)) = listener.accept() else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf);
                let _ = socket.write_all(response.as_bytes());
            }
        });
        port
    }

    fn serve(responses: Vec<String>) -> u16 {
        serve_with(|_| responses)
    }

    #[test]
    fn allow_listed_loopback_is_fetched_with_a_size_cap() {
        let body = "hello";
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let port = serve(vec![ok.clone(), ok]);
        let fetcher = stub_fetcher(&["127.0.0.1"]);
        let url = format!("http://127.0.0.1:{port}/x");
        let got = fetcher.get(&url, 100, Duration::from_secs(5)).unwrap();
        assert_eq!(got, body.as_bytes());
        let e = fetcher.get(&url, 3, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::TooLarge(3));
        assert_eq!(fetcher.handed_out().len(), 2);
    }

    #[test]
    fn finding_1_ssrf_redirect_to_a_forbidden_address_is_refused() {
        let redirect = "HTTP/1.1 302 Found\r\nLocation: http://metadata.test/x\r\n\
                        Content-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string();
        let port = serve(vec![redirect]);
        let fetcher = stub_fetcher(&["127.0.0.1"]);
        let e = fetcher
            .get(
                &format!("http://127.0.0.1:{port}/"),
                100,
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Refused, "{e:?}");
        assert_eq!(e.to_string(), FETCH_FAILED);
        // Only the allowed first hop was ever handed to the client.
        let handed: Vec<IpAddr> = fetcher.handed_out().iter().map(|a| a.ip()).collect();
        assert_eq!(handed, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn at_most_three_redirects() {
        let hop = |port: u16| {
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        };
        let port = serve_with(|port| (0..6).map(|_| hop(port)).collect());
        let fetcher = stub_fetcher(&["127.0.0.1"]);
        let e = fetcher
            .get(
                &format!("http://127.0.0.1:{port}/"),
                100,
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Failed);
        assert!(e.detail.contains("redirects"), "{e:?}");
        assert_eq!(fetcher.handed_out().len(), MAX_REDIRECTS + 1);
    }
}
