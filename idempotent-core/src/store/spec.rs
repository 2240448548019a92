//! Store specifications as applications take them from configuration (`memory`,
//! `sqlite:PATH`, `postgres://...`, `redis://...`), and the one rule that keeps their secrets out
//! of every message.
//!
//! A specification may carry a password (`redis://:secret@host`, `postgres://app:secret@db/app`,
//! `postgres://db/app?password=secret`). Every message, log line and `Debug` output of this
//! library that names a specification shows it through [`redact`] (or [`Redacted`]): the
//! password in the URL's user information and the value of every query parameter whose name
//! says it is a secret (`password`, `sslpassword`, `token`, `secret`...) become `***`; the rest
//! (scheme, user, hosts, database, other parameters) stays, so an operator can still tell which
//! store a message is about.
//!
//! ```
//! use idempotent_core::store::spec::redact;
//!
//! assert_eq!(redact("redis://:s3cret@cache:6379/0"), "redis://:***@cache:6379/0");
//! assert_eq!(redact("postgres://app:pw@db/app?sslmode=verify-full"), "postgres://app:***@db/app?sslmode=verify-full");
//! assert_eq!(redact("postgres://db/app?password=pw&application_name=x"), "postgres://db/app?password=***&application_name=x");
//! assert_eq!(redact("sqlite:/var/lib/app/idempotency.sqlite"), "sqlite:/var/lib/app/idempotency.sqlite");
//! ```
//!
//! [`Scheme::of`] tells which store a specification names, [`MemorySpec::parse`] reads the
//! memory store's bounds from `memory?max_bytes=..&actor_max_bytes=..`, and [`SharedSpec::parse`]
//! a shared store's per-caller bound from `...?actor_max_bytes=..`.

use super::StoreError;
use std::borrow::Cow;
use std::fmt;

/// What replaces a secret.
const MASK: &str = "***";

/// `spec` with its secrets replaced by `***` (see the [module docs](self)). A specification
/// without secrets is returned as it is.
pub fn redact(spec: &str) -> Cow<'_, str> {
    // The user information runs from `://` to the last `@`: a password may hold an unencoded
    // `@`, `/` or `?`. When that `@` belongs to the query instead, more than the password is
    // masked, never less.
    let mut out = String::new();
    let mut rest = spec;
    if let Some((scheme, after)) = spec.split_once("://") {
        if let Some((userinfo, hosts)) = after.rsplit_once('@') {
            if let Some((user, _password)) = userinfo.split_once(':').filter(|(_, p)| !p.is_empty()) {
                out = format!("{scheme}://{user}:{MASK}@");
                rest = hosts;
            }
        }
    }
    let (main, query) = match rest.split_once('?') {
        Some((main, query)) => (main, redact_query(query)),
        None => (rest, Cow::Borrowed("")),
    };
    if out.is_empty() && matches!(query, Cow::Borrowed(_)) {
        return Cow::Borrowed(spec);
    }
    out.push_str(main);
    if rest.contains('?') {
        out.push('?');
        out.push_str(&query);
    }
    Cow::Owned(out)
}

/// A specification that displays (and debugs) redacted: `format!("{}", Redacted(spec))`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.0))
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*redact(self.0), f)
    }
}

/// Whether a query parameter's value is a secret, by its name.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "pwd", "secret", "token", "key"].iter().any(|s| name.contains(s))
        && !matches!(name.as_str(), "sslkey" | "sslkeylog" | "prefix")
}

/// The query with the value of every secret parameter masked (`#fragment` included in the last
/// value, which is masked with it).
fn redact_query(query: &str) -> Cow<'_, str> {
    if !query.split('&').any(|pair| pair.split_once('=').is_some_and(|(n, v)| is_secret(n) && !v.is_empty())) {
        return Cow::Borrowed(query);
    }
    let pairs: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if is_secret(name) && !value.is_empty() => Cow::Owned(format!("{name}={MASK}")),
            _ => Cow::Borrowed(pair),
        })
        .collect();
    Cow::Owned(pairs.join("&"))
}

/// Which store a specification names, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `memory` (with optional bounds: [`MemorySpec`]).
    Memory,
    /// `sqlite:PATH`, `sqlite://PATH`, `sqlite::memory:`.
    Sqlite,
    /// `postgres://...`, `postgresql://...`.
    Postgres,
    /// `mysql://...`, `mariadb://...`.
    Mysql,
    /// `redis://...`, `redis+unix://...`, `unix://...`.
    Redis,
    /// `redis+cluster://h1:p1,h2:p2`.
    RedisCluster,
    /// `rediss://...` (Redis over TLS).
    RedisTls,
    /// `rediss+cluster://...` (Redis Cluster over TLS).
    RedisClusterTls,
}

impl Scheme {
    /// The store `spec` names; [`StoreError::Config`] (showing the specification redacted) for
    /// an unknown scheme.
    pub fn of(spec: &str) -> Result<Scheme, StoreError> {
        let scheme = spec.split([':', '?']).next().unwrap_or_default();
        Ok(match scheme {
            "memory" if spec == "memory" || spec.starts_with("memory?") => Scheme::Memory,
            "sqlite" => Scheme::Sqlite,
            "postgres" | "postgresql" => Scheme::Postgres,
            "mysql" | "mariadb" => Scheme::Mysql,
            "redis" | "redis+unix" | "unix" => Scheme::Redis,
            "redis+cluster" => Scheme::RedisCluster,
            "rediss" => Scheme::RedisTls,
            "rediss+cluster" => Scheme::RedisClusterTls,
            _ => {
                return Err(StoreError::Config(format!(
                    "unknown store `{}`: use `memory`, `sqlite:PATH`, `postgres://...`, `mysql://...` or `redis://...` (with the matching cargo feature enabled)",
                    redact(spec)
                )))
            }
        })
    }

    /// The cargo feature of idempotent-core that builds this store (`None`: always built).
    pub const fn feature(self) -> Option<&'static str> {
        match self {
            Scheme::Memory => None,
            Scheme::Sqlite => Some("sqlite"),
            Scheme::Postgres => Some("postgres"),
            Scheme::Mysql => Some("mysql"),
            Scheme::Redis | Scheme::RedisCluster | Scheme::RedisTls | Scheme::RedisClusterTls => Some("redis"),
        }
    }
}

/// The bounds of a memory store, from `memory` or `memory?max_bytes=..&actor_max_bytes=..`.
///
/// | parameter | meaning | default |
/// |---|---|---|
/// | `max_bytes` | the whole store's byte budget | [`DEFAULT_MAX_BYTES`](super::memory::DEFAULT_MAX_BYTES) |
/// | `max_records` | the whole store's number of records | unbounded |
/// | `actor_max_bytes` | one caller's bytes (`0`: no per-caller bound) | an eighth of `max_bytes` |
/// | `actor_max_records` | one caller's number of records | unbounded |
///
/// Sizes are bytes, or with a suffix `KiB`, `MiB`, `GiB` (`kB`, `MB`, `GB` for powers of ten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySpec {
    /// The store's byte budget.
    pub max_bytes: usize,
    /// The store's bound on records.
    pub max_records: usize,
    /// One caller's byte budget; `None`: no per-caller bound on bytes.
    pub actor_max_bytes: Option<usize>,
    /// One caller's bound on records; `None`: none.
    pub actor_max_records: Option<usize>,
}

impl Default for MemorySpec {
    fn default() -> Self {
        let max_bytes = super::memory::DEFAULT_MAX_BYTES;
        Self {
            max_bytes,
            max_records: usize::MAX,
            actor_max_bytes: Some(super::memory::default_actor_max_bytes(max_bytes)),
            actor_max_records: None,
        }
    }
}

impl MemorySpec {
    /// Reads `memory` or `memory?name=value&...`; an unknown parameter or a malformed size is
    /// [`StoreError::Config`] naming it.
    pub fn parse(spec: &str) -> Result<Self, StoreError> {
        let query = match spec.strip_prefix("memory") {
            Some("") => return Ok(Self::default()),
            Some(rest) => rest.strip_prefix('?'),
            None => None,
        };
        let Some(query) = query else {
            return Err(StoreError::Config(format!(
                "`{}` is not a memory store: write `memory` or `memory?max_bytes=256MiB&actor_max_bytes=32MiB`",
                redact(spec)
            )));
        };
        let (mut out, mut actor_bytes_set) = (Self::default(), false);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let size = || {
                parse_size(value).ok_or_else(|| {
                    StoreError::Config(format!(
                        "memory store parameter `{name}={value}` is not a size: write bytes, or a number with KiB, MiB, GiB (kB, MB, GB)"
                    ))
                })
            };
            match name {
                "max_bytes" => out.max_bytes = size()?,
                "max_records" => out.max_records = size()?.max(1),
                "actor_max_bytes" => {
                    actor_bytes_set = true;
                    out.actor_max_bytes = Some(size()?).filter(|n| *n > 0);
                }
                "actor_max_records" => out.actor_max_records = Some(size()?).filter(|n| *n > 0),
                other => {
                    return Err(StoreError::Config(format!(
                        "unknown memory store parameter `{other}`: expected max_bytes, max_records, actor_max_bytes or actor_max_records"
                    )))
                }
            }
        }
        if !actor_bytes_set {
            out.actor_max_bytes = Some(super::memory::default_actor_max_bytes(out.max_bytes));
        }
        Ok(out)
    }
}

/// A shared store's specification (`sqlite:`, `postgres://`, `mysql://`, `redis://`...) with this
/// library's own query parameter taken out: `actor_max_bytes`, one caller's byte bound (see
/// [`super::quota`]), with the same sizes as [`MemorySpec`] (`0`: no bound, the default).
///
/// | parameter | meaning | default |
/// |---|---|---|
/// | `actor_max_bytes` | one caller's bytes of live records (`0`: no per-caller bound) | no bound |
///
/// ```
/// use idempotent_core::store::spec::SharedSpec;
///
/// let spec = SharedSpec::parse("postgres://app:pw@db/app?sslmode=verify-full&actor_max_bytes=32MiB").unwrap();
/// assert_eq!(spec.url, "postgres://app:pw@db/app?sslmode=verify-full");
/// assert_eq!(spec.actor_max_bytes, Some(32 << 20));
/// assert_eq!(SharedSpec::parse("sqlite:app.db").unwrap().actor_max_bytes, None);
/// ```
///
/// The parameter is read here once and removed from the URL the database driver is given, which
/// would refuse it or send it to the server as a setting.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSpec<'a> {
    /// The specification without `actor_max_bytes`, for the database driver.
    pub url: Cow<'a, str>,
    /// One caller's byte budget; `None`: no per-caller bound.
    pub actor_max_bytes: Option<usize>,
}

impl fmt::Debug for SharedSpec<'_> {
    /// Redacted, as every specification this library shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSpec")
            .field("url", &Redacted(&self.url))
            .field("actor_max_bytes", &self.actor_max_bytes)
            .finish()
    }
}

impl fmt::Display for SharedSpec<'_> {
    /// The URL, redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl<'a> SharedSpec<'a> {
    /// Reads `spec`'s `actor_max_bytes` and removes it; a malformed size is
    /// [`StoreError::Config`] naming the parameter (and never showing a password of `spec`).
    pub fn parse(spec: &'a str) -> Result<Self, StoreError> {
        // The query starts at the first `?` after the user information (a password may hold a
        // `?`), or, when that `@` was the query's own, at the first `?`; it ends at a
        // `#fragment`.
        let authority = spec.find("://").map_or(0, |at| at + 3);
        let hosts = spec[authority..].rfind('@').map_or(authority, |at| authority + at + 1);
        let first = |from: usize| spec[from..].find('?').map(|at| from + at);
        let Some(start) = first(hosts).or_else(|| first(authority)) else {
            return Ok(Self { url: Cow::Borrowed(spec), actor_max_bytes: None });
        };
        let end = spec[start..].find('#').map_or(spec.len(), |at| start + at);
        let query = &spec[start + 1..end];
        if !query.split('&').any(|pair| pair.split('=').next() == Some("actor_max_bytes")) {
            return Ok(Self { url: Cow::Borrowed(spec), actor_max_bytes: None });
        }
        let mut actor_max_bytes = None;
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("actor_max_bytes", value) => {
                    let bytes = parse_size(value).ok_or_else(|| {
                        StoreError::Config(format!(
                            "store parameter `actor_max_bytes={value}` of `{}` is not a size: write bytes, or a number with KiB, MiB, GiB (kB, MB, GB); 0 for no per-caller bound",
                            redact(spec)
                        ))
                    })?;
                    actor_max_bytes = Some(bytes).filter(|n| *n > 0);
                }
                _ => kept.push(pair),
            }
        }
        let mut url = spec[..start].to_owned();
        if !kept.is_empty() {
            url.push('?');
            url.push_str(&kept.join("&"));
        }
        url.push_str(&spec[end..]);
        Ok(Self { url: Cow::Owned(url), actor_max_bytes })
    }
}

/// `123`, `64KiB`, `256MiB`, `2GiB`, `10kB`, `5MB`, `1GB`: a number of bytes; `None` when
/// malformed or too large.
fn parse_size(text: &str) -> Option<usize> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let (number, unit) = text.split_at(digits);
    let factor: usize = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number.parse::<usize>().ok()?.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let cases = [
            ("redis://:pw@h:6379", "redis://:***@h:6379"),
            ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
            ("rediss+cluster://u:p@ss@h1:1,h2:2/?prefix=app:", "rediss+cluster://u:***@h1:1,h2:2/?prefix=app:"),
            ("postgres://app:a/b@c@db:5432/app", "postgres://app:***@db:5432/app"),
            ("postgres://db/app?sslmode=require&password=pw", "postgres://db/app?sslmode=require&password=***"),
            ("mysql://root@db/app?ssl-mode=VERIFY_IDENTITY", "mysql://root@db/app?ssl-mode=VERIFY_IDENTITY"),
            ("postgres://db/app?sslkey=/k.pem&sslpassword=x", "postgres://db/app?sslkey=/k.pem&sslpassword=***"),
            ("redis://:pa?ss@h:1", "redis://:***@h:1"),
            ("postgres://db/app?application_name=me@x", "postgres://db/app?application_name=me@x"),
            ("postgres://u:p@db/app?application_name=me@x", "postgres://u:***@x"),
            ("memory", "memory"),
            ("sqlite::memory:", "sqlite::memory:"),
        ];
        for (spec, shown) in cases {
            assert_eq!(redact(spec), shown, "{spec}");
            assert_eq!(redact(shown), shown, "redacting twice changes nothing");
            assert_eq!(format!("{}", Redacted(spec)), shown);
            assert_eq!(format!("{:?}", Redacted(spec)), format!("{shown:?}"));
        }
        assert!(matches!(redact("redis://h:1"), Cow::Borrowed(_)), "nothing to hide: no copy");
    }

    #[test]
    fn schemes_and_unknown_ones() {
        assert_eq!(Scheme::of("memory").unwrap(), Scheme::Memory);
        assert_eq!(Scheme::of("memory?max_bytes=1MiB").unwrap(), Scheme::Memory);
        assert_eq!(Scheme::of("sqlite:x.db").unwrap(), Scheme::Sqlite);
        assert_eq!(Scheme::of("postgresql://h/d").unwrap(), Scheme::Postgres);
        assert_eq!(Scheme::of("mariadb://h/d").unwrap(), Scheme::Mysql);
        assert_eq!(Scheme::of("rediss+cluster://h:1").unwrap(), Scheme::RedisClusterTls);
        let error = Scheme::of("mongodb://u:hunter2@h/d").unwrap_err().to_string();
        assert!(error.contains("unknown store `mongodb://u:***@h/d`"), "{error}");
        assert!(!error.contains("hunter2"));
        assert!(Scheme::of("memoryx").is_err());
    }

    #[test]
    fn shared_stores_take_the_actor_bound_out_of_their_url() {
        let cases = [
            ("sqlite:/tmp/x.db?actor_max_bytes=1MiB", "sqlite:/tmp/x.db", Some(1 << 20)),
            ("sqlite:/tmp/x.db", "sqlite:/tmp/x.db", None),
            (
                "postgres://u:p?w@db/app?actor_max_bytes=2kB&sslmode=require",
                "postgres://u:p?w@db/app?sslmode=require",
                Some(2000),
            ),
            (
                "mysql://root@db/app?ssl-mode=DISABLED&actor_max_bytes=100",
                "mysql://root@db/app?ssl-mode=DISABLED",
                Some(100),
            ),
            ("redis://h:1/?prefix=app:&actor_max_bytes=0", "redis://h:1/?prefix=app:", None),
            ("rediss://h:1/?actor_max_bytes=64KiB#insecure", "rediss://h:1/#insecure", Some(64 << 10)),
            ("redis+cluster://h1:1,h2:2/?actor_max_bytes=3MB", "redis+cluster://h1:1,h2:2/", Some(3_000_000)),
            (
                "postgres://db/app?application_name=me@x&actor_max_bytes=1kB",
                "postgres://db/app?application_name=me@x",
                Some(1000),
            ),
        ];
        for (spec, url, bound) in cases {
            let parsed = SharedSpec::parse(spec).unwrap();
            assert_eq!((parsed.url.as_ref(), parsed.actor_max_bytes), (url, bound), "{spec}");
        }
        assert!(
            matches!(SharedSpec::parse("sqlite:x.db").unwrap().url, Cow::Borrowed(_)),
            "nothing to take out: no copy"
        );
        for bad in
            ["sqlite:x.db?actor_max_bytes=lots", "sqlite:x.db?actor_max_bytes=", "sqlite:x.db?actor_max_bytes=5TiB"]
        {
            let Err(StoreError::Config(message)) = SharedSpec::parse(bad) else { panic!("{bad}") };
            assert!(message.contains("actor_max_bytes") && message.contains("is not a size"), "{message}");
        }
        // The parameter's paths keep the redaction rule: the password never shows.
        let bad = "postgres://app:hunter2@db/app?password=hunter2&actor_max_bytes=much";
        let Err(StoreError::Config(message)) = SharedSpec::parse(bad) else { panic!() };
        assert!(
            !message.contains("hunter2") && message.contains("postgres://app:***@db/app?password=***"),
            "{message}"
        );
        let parsed = SharedSpec::parse("redis://:hunter2@h:1/?actor_max_bytes=1MiB").unwrap();
        assert_eq!(parsed.to_string(), "redis://:***@h:1/");
        assert!(!format!("{parsed:?}").contains("hunter2"), "{parsed:?}");
    }

    #[test]
    fn memory_bounds() {
        assert_eq!(MemorySpec::parse("memory").unwrap(), MemorySpec::default());
        let spec = MemorySpec::parse("memory?max_bytes=64MiB&actor_max_records=100").unwrap();
        assert_eq!(spec.max_bytes, 64 << 20);
        assert_eq!(spec.actor_max_bytes, Some(8 << 20), "the default share follows the budget");
        assert_eq!(spec.actor_max_records, Some(100));
        let off = MemorySpec::parse("memory?actor_max_bytes=0").unwrap();
        assert_eq!(off.actor_max_bytes, None);
        assert_eq!(MemorySpec::parse("memory?actor_max_bytes=2kB").unwrap().actor_max_bytes, Some(2000));
        for bad in [
            "memory?max_bytes=lots",
            "memory?max_bytes=1TiB9",
            "memory?colour=red",
            "memory?max_bytes=99999999999999999999GiB",
        ] {
            assert!(matches!(MemorySpec::parse(bad), Err(StoreError::Config(_))), "{bad}");
        }
    }
}
