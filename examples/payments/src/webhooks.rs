//! `POST /webhooks/provider`: a payment provider's events, signed per the Standard Webhooks
//! specification (<https://www.standardwebhooks.com>), which Svix, Resend, Clerk and others follow.
//!
//! The sender signs `{webhook-id}.{webhook-timestamp}.{body}` with HMAC-SHA256 under the shared
//! secret (`whsec_` and the key in base64), and sends `webhook-signature: v1,<base64 signature>`
//! (several, space-separated, while it rotates its secret). [`verify`] checks that one of them
//! matches and that the timestamp is within five minutes of the receiver's clock (an old,
//! captured delivery cannot be replayed later). Each binary runs it in the route's body
//! extractor: a delivery that does not verify is 401, before anything is claimed, executed or
//! stored. The route's caller is the sender, [`SENDER`], the actor its records are filed under,
//! set by an extractor before the body (where the idempotency layer reads the caller).
//!
//! The sender names each event in `webhook-id` and delivers it at least once, retrying for days:
//! the route's key is that header (`key = header("webhook-id")`), its identity the whole body, so a
//! redelivery replays the first answer and a different event under the same id is 422.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The actor of every delivery that verifies: the provider, one identity.
pub const SENDER: &str = "webhook-sender:provider";

/// The default signing secret of the demo (`PAYMENTS_WEBHOOK_SECRET`).
pub const DEFAULT_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How far a delivery's timestamp may be from the receiver's clock.
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// A signing secret: the key bytes of `whsec_<base64>`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads `whsec_<base64>`; a malformed secret is an error naming the setting.
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text.strip_prefix("whsec_").unwrap_or(text);
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .filter(|key| !key.is_empty())
            .map(Secret)
            .ok_or_else(|| "PAYMENTS_WEBHOOK_SECRET is not a Standard Webhooks secret (`whsec_` and base64)".to_owned())
    }

    /// The `v1,<base64>` signature of a delivery (what a sender sends).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Why a delivery is refused: 401, nothing claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `webhook-id`, `webhook-timestamp` or `webhook-signature` is absent (or sent twice).
    #[error("the delivery lacks its `{0}` header")]
    Missing(&'static str),
    /// The timestamp is not a number, or more than five minutes off.
    #[error("the delivery's timestamp is not within five minutes of now")]
    Stale,
    /// No signature matches.
    #[error("no signature of the delivery matches")]
    BadSignature,
}

/// A delivery whose signature verified: its `webhook-id` and its event.
#[derive(Debug, Clone)]
pub struct Delivery<T> {
    /// The sender's id of the event: the same on every delivery of it.
    pub id: String,
    /// The event.
    pub event: T,
}

impl Delivery<()> {
    /// Checks a delivery ([`verify`]) and keeps its id, for the event to be read next.
    pub fn verify<'a>(
        secret: &Secret,
        header: impl Fn(&'static str) -> Option<&'a str>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Self, Refused> {
        verify(secret, &header, body, now)?;
        Ok(Delivery { id: header("webhook-id").unwrap_or_default().to_owned(), event: () })
    }

    /// The delivery with its event.
    pub fn with<T>(self, event: T) -> Delivery<T> {
        Delivery { id: self.id, event }
    }
}

/// Checks a delivery: `header` reads one of its headers (once), `body` is its raw body.
pub fn verify<'a>(
    secret: &Secret,
    header: impl Fn(&'static str) -> Option<&'a str>,
    body: &[u8],
    now: SystemTime,
) -> Result<(), Refused> {
    let id = header("webhook-id").ok_or(Refused::Missing("webhook-id"))?;
    let timestamp = header("webhook-timestamp").ok_or(Refused::Missing("webhook-timestamp"))?;
    let signatures = header("webhook-signature").ok_or(Refused::Missing("webhook-signature"))?;
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| Refused::Stale)?;
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if timestamp.abs_diff(now) > TOLERANCE.as_secs() {
        return Err(Refused::Stale);
    }
    // Compared in constant time, like every MAC.
    let matches = |candidate: &str| {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&secret.0).expect("HMAC takes any key");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let given =
            candidate.strip_prefix("v1,").and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        given.is_some_and(|given| mac.verify_slice(&given).is_ok())
    };
    if signatures.split(' ').any(matches) {
        Ok(())
    } else {
        Err(Refused::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_delivery_verifies_and_any_change_is_refused() {
        let secret = Secret::parse(DEFAULT_SECRET).unwrap();
        let now = SystemTime::now();
        let ts = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let body = br#"{"type":"charge.succeeded","data":{"charge":"ch_1","amount":100}}"#;
        let signature = secret.sign("msg_1", ts, body);
        let headers = |id: &'static str, ts: String, sig: String| {
            move |name: &'static str| -> Option<String> {
                match name {
                    "webhook-id" => Some(id.to_owned()),
                    "webhook-timestamp" => Some(ts.clone()),
                    "webhook-signature" => Some(sig.clone()),
                    _ => None,
                }
            }
        };
        let check = |id, ts: i64, sig: &str, body: &[u8]| {
            let h = headers(id, ts.to_string(), sig.to_owned());
            let values: Vec<(&'static str, Option<String>)> =
                ["webhook-id", "webhook-timestamp", "webhook-signature"].iter().map(|n| (*n, h(n))).collect();
            verify(&secret, |name| values.iter().find(|(n, _)| *n == name).and_then(|(_, v)| v.as_deref()), body, now)
        };
        assert_eq!(check("msg_1", ts, &signature, body), Ok(()));
        assert_eq!(check("msg_1", ts, &format!("v1,bm9wZQ== {signature}"), body), Ok(()), "one of several");
        assert_eq!(check("msg_2", ts, &signature, body), Err(Refused::BadSignature), "another id");
        assert_eq!(check("msg_1", ts, &signature, b"{}"), Err(Refused::BadSignature), "another body");
        assert_eq!(check("msg_1", ts - 301, &secret.sign("msg_1", ts - 301, body), body), Err(Refused::Stale));
        let other = Secret::parse("whsec_c2VjcmV0LW9mLXNvbWVvbmUtZWxzZQ==").unwrap();
        assert_eq!(check("msg_1", ts, &other.sign("msg_1", ts, body), body), Err(Refused::BadSignature));
        assert!(Secret::parse("whsec_!!!").is_err());
    }
}
