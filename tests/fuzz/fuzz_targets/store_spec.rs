//! Store specifications (`store::spec`): `redact`, `Redacted`, `Scheme::of` and
//! `MemorySpec::parse`, the code that reads what an operator configures and must never print a
//! password.
//!
//! The input is bytes read as: a scheme (byte 0, into [`SCHEMES`]), flags (byte 1: a user
//! information with a password, a secret query parameter, a plain query parameter), then four
//! texts separated by `0xFF` bytes (which UTF-8 never uses): the user, the password, the host
//! and path, the secret parameter's value. Invalid UTF-8 is read as U+FFFD. The user, host and
//! values cannot hold the characters that end them (`@`, `:`, `?`, `&`, `#`), which are dropped;
//! the password can hold anything but is never empty. The mark that brackets each secret is
//! dropped from the other texts.
//!
//! Checked, for the specification put together from them and for the raw input as text:
//! - nothing panics;
//! - the password and the secret parameter's value appear nowhere in `redact`'s output, in
//!   `Redacted`'s `Display` and `Debug`, or in the message of any error `Scheme::of` or
//!   `MemorySpec::parse` gives (each is marked so that it cannot occur by chance);
//! - redacting is idempotent, and a specification with nothing to hide is returned borrowed and
//!   unchanged;
//! - `Scheme::of` names the scheme the specification was built with;
//! - `MemorySpec::parse` of `memory?...` either reads bounds (at least one record) or names the
//!   parameter it refused.
#![no_main]

use idempotent_core::store::spec::{redact, MemorySpec, Redacted, Scheme};
use libfuzzer_sys::fuzz_target;
use std::borrow::Cow;

/// The schemes put in front, with the one `Scheme::of` must name.
const SCHEMES: &[(&str, Scheme)] = &[
    ("postgres", Scheme::Postgres),
    ("postgresql", Scheme::Postgres),
    ("mysql", Scheme::Mysql),
    ("mariadb", Scheme::Mysql),
    ("redis", Scheme::Redis),
    ("rediss", Scheme::RedisTls),
    ("redis+cluster", Scheme::RedisCluster),
    ("rediss+cluster", Scheme::RedisClusterTls),
];

/// Secret query parameters, as drivers name them.
const SECRET_PARAMS: &[&str] = &["password", "sslpassword", "PASSWORD", "auth_token", "client_secret", "api_key"];

/// Marks a secret so that finding it in an output is never a coincidence.
const MARK: &str = "\u{1F511}";

fuzz_target!(|data: &[u8]| {
    // The raw input, as any text an operator might write.
    let raw = String::from_utf8_lossy(data);
    check_any(&raw);

    let mut rest = data;
    let mut byte = || {
        let (head, tail) = rest.split_first().map_or((0, &[][..]), |(h, t)| (*h, t));
        rest = tail;
        head
    };
    let (scheme, expected) = SCHEMES[byte() as usize % SCHEMES.len()];
    let flags = byte();
    let secret_param = SECRET_PARAMS[byte() as usize % SECRET_PARAMS.len()];
    let mut parts = rest.split(|&b| b == 0xFF).map(|p| String::from_utf8_lossy(p).into_owned());
    let mut part = || parts.next().unwrap_or_default();
    let plain = |s: String| s.replace(MARK, "").chars().filter(|c| !"@:?&#".contains(*c)).collect::<String>();
    let user = plain(part());
    let password = format!("{MARK}{}{MARK}", part());
    let host = plain(part());
    let value = format!("{MARK}{}{MARK}", plain(part()));

    let mut spec = format!("{scheme}://");
    let mut secrets = Vec::new();
    if flags & 1 != 0 {
        spec.push_str(&format!("{user}:{password}@"));
        secrets.push(password.as_str());
    }
    spec.push_str(&host);
    let mut query = Vec::new();
    if flags & 2 != 0 {
        query.push(format!("{secret_param}={value}"));
        secrets.push(value.as_str());
    }
    if flags & 4 != 0 {
        query.push("application_name=app".to_owned());
    }
    if !query.is_empty() {
        spec.push('?');
        spec.push_str(&query.join("&"));
    }

    let redacted = redact(&spec);
    for secret in &secrets {
        for (what, text) in [
            ("redact", redacted.to_string()),
            ("Display", Redacted(&spec).to_string()),
            ("Debug", format!("{:?}", Redacted(&spec))),
        ] {
            assert!(!text.contains(secret), "{what} of {spec:?} shows {secret:?}: {text:?}");
        }
    }
    assert_eq!(Scheme::of(&spec).ok(), Some(expected), "{spec:?}");
    // With the scheme unknown, the error names the specification, redacted.
    let unknown = format!("x{spec}");
    if let Err(e) = Scheme::of(&unknown) {
        for secret in &secrets {
            assert!(!e.to_string().contains(secret), "the error of {unknown:?} shows {secret:?}: {e}");
        }
    }
    if secrets.is_empty() && !spec.contains('@') {
        assert_eq!(redacted, spec, "nothing to hide, yet changed");
    }
});

/// Properties of any text taken as a specification.
fn check_any(spec: &str) {
    let once = redact(spec);
    assert_eq!(redact(&once), once, "redacting {spec:?} twice changed it");
    if let Cow::Borrowed(same) = once {
        assert_eq!(same, spec);
    }
    let _ = Scheme::of(spec);
    let memory = format!("memory?{spec}");
    match MemorySpec::parse(&memory) {
        Ok(bounds) => assert!(bounds.max_records >= 1, "{memory:?} allows no record"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
