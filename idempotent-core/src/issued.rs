//! Server-issued tokens: the idempotency key of a browser form, which sends no key header.
//!
//! A route declared `key = issued(ttl = "15m", from = form("_idem"))` takes its key from a token
//! the server minted while rendering the form (or handed to a script by the mint endpoint,
//! [`crate::protocol::tokens`]). A token is
//!
//! - **unguessable**: 128 random bits;
//! - **bound** to the caller (the digest of its actor, as stores see it), the route's scope and an
//!   expiry, by HMAC-SHA256 under a server secret ([`TokenKey`], the builder's `token_secret`);
//! - **checked before any store round trip**: a malformed, forged, expired or another caller's
//!   token is refused on the MAC alone (compared in constant time), so guessing costs the store
//!   nothing;
//! - **recorded** when minted: an "issued" record of its own in the store, for the token's ttl,
//!   and at most [`Config::token_quota`](crate::engine::Config::token_quota) live tokens per
//!   caller per process. A submit finds that record (one renewal, no write of any state) before
//!   it claims: a token the store no longer knows (lost, or revoked by deleting the record) is
//!   refused even though its MAC holds.
//!
//! A submit then claims the token's key like any other key, with the same claim, lease and
//! fencing, so the token's life is the record's: issued (no claim yet) → in progress (one
//! atomic claim: a double click or a second tab finds it in progress and waits, or gets 409, per
//! route) → completed (every resubmit of the same form replays the outcome, a 303 as that 303). A
//! handler that fails with a retryable status or panics releases the claim, and a crashed
//! process's claim expires with its lease: the token is "issued" again and the same form can be
//! submitted again. The same token with other values (an edited stale form) is 422, never the old
//! result. The record's ttl must cover the token's (checked when the runtime starts).
//!
//! ```
//! use idempotent_core::issued::{TokenError, TokenKey};
//! use std::time::{Duration, SystemTime};
//!
//! let key = TokenKey::new(b"a secret of the service, 32 bytes or more".as_slice());
//! let now = SystemTime::now();
//! let token = key.mint("actor-digest", "checkout.create", Duration::from_secs(900), now);
//! let verified = key.verify(&token.token, "actor-digest", "checkout.create", now).unwrap();
//! assert_eq!(verified.id.len(), 32);
//! assert_eq!(key.verify(&token.token, "someone-else", "checkout.create", now), Err(TokenError::Forbidden));
//! assert_eq!(key.verify(&token.token, "actor-digest", "checkout.create", now + Duration::from_secs(901)), Err(TokenError::Expired));
//! ```
//!
//! # Threat model
//! A token answers "has this form been submitted already?", and nothing else.
//!
//! - **It is not CSRF protection.** It is bound to the caller, so another site cannot submit a
//!   token of its own for the victim; but a page that can read the victim's form (an XSS, a
//!   same-site subdomain) can read the token too, and the mint endpoint hands a token to any
//!   authenticated request, including one a browser sends cross-site with its cookies. Keep
//!   `SameSite` cookies, an origin check or a CSRF token of the framework's.
//! - It is not authentication: the caller is whoever the application's authentication says; the
//!   token only proves that this server minted it for that caller and scope, before its expiry.
//! - Anonymous callers (no actor) share one namespace: a token minted for one of them is
//!   accepted from any of them. Route forms of anonymous visitors through a session actor.
//! - A leaked token lets its holder submit that one form once more as the same caller, which the
//!   caller could do anyway; it replays that caller's outcome to that caller only.
//! - The secret must be the same on every instance sharing the store, and secret (a holder can
//!   mint tokens for any caller it can name). Rotating it invalidates the tokens of forms already
//!   rendered: their submits are 403 and the user loads the form again.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The domain tag of a token's MAC.
const TOKEN_TAG: &[u8] = b"idempotent-token/v1\0";
/// The domain tag of the claim token of an issued record.
const ISSUED_TAG: &[u8] = b"idempotent-issued/v1\0";
/// Bytes of randomness in a token.
const ID_BYTES: usize = 16;
/// Bytes of the MAC kept in a token (128 bits: forging one is 2^128 guesses, each a request).
const TAG_BYTES: usize = 16;
/// Length of a token in hex characters: id, expiry (8 bytes), tag.
pub const TOKEN_LEN: usize = 2 * (ID_BYTES + 8 + TAG_BYTES);
/// The prefix of an issued record's key in the store (the submit's own record is filed under the
/// bare id).
pub const ISSUED_PREFIX: &str = "issued.";

/// Why a token is refused, before any store round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this library (wrong length or not hex): 400.
    #[error("the form token is malformed")]
    Malformed,
    /// The MAC does not hold: minted for another caller or another scope, under another secret, or
    /// made up: 403.
    #[error("the form token was not issued to this caller for this form")]
    Forbidden,
    /// Past its expiry: 400.
    #[error("the form token has expired")]
    Expired,
}

/// A freshly minted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token: 80 lowercase hex characters, to render into the form.
    pub token: String,
    /// Its id: the idempotency key a submit claims (32 hex characters).
    pub id: String,
    /// When it stops being accepted (whole seconds).
    pub expires_at: SystemTime,
}

/// A token whose MAC and expiry hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Its id: the idempotency key a submit claims.
    pub id: String,
    /// When it stops being accepted.
    pub expires_at: SystemTime,
}

/// The server secret tokens are minted and verified under (HMAC-SHA256). Cheap to clone; `Debug`
/// never shows it.
#[derive(Clone)]
pub struct TokenKey(Arc<Hmac<Sha256>>);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(secret)")
    }
}

impl TokenKey {
    /// Tokens under `secret` (32 random bytes or more; the same on every instance).
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_ref()).expect("HMAC accepts keys of any length");
        Self(Arc::new(mac))
    }

    fn tag(&self, actor: &str, scope: &str, id: &[u8], expires: u64) -> Hmac<Sha256> {
        let mut mac = (*self.0).clone();
        mac.update(TOKEN_TAG);
        for part in [actor.as_bytes(), scope.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(id);
        mac.update(&expires.to_be_bytes());
        mac
    }

    /// A new token for `actor` (its digest, as stores see it; empty for anonymous) on `scope`,
    /// valid for `ttl` from `now` (rounded up to whole seconds).
    pub fn mint(&self, actor: &str, scope: &str, ttl: Duration, now: SystemTime) -> IssuedToken {
        let id = uuid::Uuid::new_v4().into_bytes();
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let expires = (since_epoch + ttl).as_secs() + u64::from((since_epoch + ttl).subsec_nanos() > 0);
        let tag = self.tag(actor, scope, &id, expires).finalize().into_bytes();
        let mut token = String::with_capacity(TOKEN_LEN);
        crate::push_hex(&mut token, &id);
        crate::push_hex(&mut token, &expires.to_be_bytes());
        crate::push_hex(&mut token, &tag[..TAG_BYTES]);
        IssuedToken {
            id: token[..2 * ID_BYTES].to_owned(),
            token,
            expires_at: UNIX_EPOCH + Duration::from_secs(expires),
        }
    }

    /// Checks `token` for `actor` (digest) on `scope` at `now`: its shape, its MAC (in constant
    /// time), then its expiry. Touches no store.
    pub fn verify(&self, token: &str, actor: &str, scope: &str, now: SystemTime) -> Result<Verified, TokenError> {
        let bytes = unhex(token).filter(|b| b.len() == TOKEN_LEN / 2).ok_or(TokenError::Malformed)?;
        let (id, rest) = bytes.split_at(ID_BYTES);
        let (expires, tag) = rest.split_at(8);
        let expires = u64::from_be_bytes(expires.try_into().map_err(|_| TokenError::Malformed)?);
        // `verify_truncated_left` compares in constant time.
        self.tag(actor, scope, id, expires).verify_truncated_left(tag).map_err(|_| TokenError::Forbidden)?;
        let expires_at = UNIX_EPOCH + Duration::from_secs(expires);
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        Ok(Verified { id: crate::hex(id), expires_at })
    }

    /// The claim token the issued record of token `id` is held with: derived from the id under
    /// the secret, so that a submit can prove the record is the one minting wrote.
    pub fn issued_claim(&self, id: &str) -> crate::store::ClaimToken {
        let mut mac = (*self.0).clone();
        mac.update(ISSUED_TAG);
        mac.update(id.as_bytes());
        crate::store::ClaimToken(crate::hex(&mac.finalize().into_bytes()[..16]))
    }
}

/// `text` as bytes, when it is lowercase or uppercase hex of even length.
fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes.chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// The per-caller bound on live tokens, kept by each process: a caller that mints without
/// submitting (a script reloading a form) is refused once it holds `quota` tokens that have not
/// expired, instead of filling the store with issued records.
#[derive(Debug, Default)]
pub struct Quota {
    live: Mutex<Live>,
}

#[derive(Debug, Default)]
struct Live {
    by_actor: HashMap<String, Vec<SystemTime>>,
    /// Mints since the last sweep of every caller.
    since_sweep: usize,
}

/// Every this many mints, callers whose tokens all expired are forgotten.
const SWEEP_EVERY: usize = 1024;

impl Quota {
    /// Counts one more token of `actor` expiring at `expires_at`, unless it already holds `quota`
    /// live ones at `now`: then `Err` with the time until its first one expires.
    pub fn admit(&self, actor: &str, quota: usize, now: SystemTime, expires_at: SystemTime) -> Result<(), Duration> {
        let mut live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        live.since_sweep += 1;
        if live.since_sweep >= SWEEP_EVERY {
            // Callers whose tokens all expired are forgotten, so the map holds live callers only.
            live.since_sweep = 0;
            live.by_actor.retain(|_, expiries| {
                expiries.retain(|e| *e > now);
                !expiries.is_empty()
            });
        }
        let expiries = live.by_actor.entry(actor.to_owned()).or_default();
        expiries.retain(|e| *e > now);
        if expiries.len() >= quota {
            let first = expiries.iter().min().copied().unwrap_or(now);
            return Err(first.duration_since(now).unwrap_or_default());
        }
        expiries.push(expires_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"test secret")
    }

    #[test]
    fn a_token_is_bound_to_actor_scope_secret_and_expiry() {
        let now = SystemTime::now();
        let t = key().mint("a", "s.create", Duration::from_secs(60), now);
        assert_eq!(t.token.len(), TOKEN_LEN);
        assert!(t.token.starts_with(&t.id));
        assert_eq!(key().verify(&t.token, "a", "s.create", now).unwrap().id, t.id);
        assert_eq!(key().verify(&t.token, "b", "s.create", now), Err(TokenError::Forbidden));
        assert_eq!(key().verify(&t.token, "a", "s.other", now), Err(TokenError::Forbidden));
        assert_eq!(TokenKey::new(b"other").verify(&t.token, "a", "s.create", now), Err(TokenError::Forbidden));
        assert_eq!(key().verify(&t.token, "a", "s.create", now + Duration::from_secs(61)), Err(TokenError::Expired));
    }

    #[test]
    fn the_length_prefix_keeps_actor_and_scope_apart() {
        let now = SystemTime::now();
        let t = key().mint("ab", "c", Duration::from_secs(60), now);
        assert_eq!(key().verify(&t.token, "a", "bc", now), Err(TokenError::Forbidden));
    }

    #[test]
    fn an_altered_token_is_refused() {
        let now = SystemTime::now();
        let t = key().mint("a", "s", Duration::from_secs(60), now);
        // A later expiry written into the token breaks its MAC.
        let mut later = t.token.clone();
        later.replace_range(32..48, "ffffffffffffffff");
        assert_eq!(key().verify(&later, "a", "s", now), Err(TokenError::Forbidden));
        for bad in ["", "xyz", &t.token[..78], &format!("{}0", t.token), &t.token.replace(&t.token[..2], "zz")] {
            assert_eq!(key().verify(bad, "a", "s", now), Err(TokenError::Malformed), "{bad}");
        }
        // Hex case does not matter to the MAC, so an upper-case copy is the same token.
        assert!(key().verify(&t.token.to_ascii_uppercase(), "a", "s", now).is_ok());
    }

    #[test]
    fn two_tokens_differ_and_their_issued_claims_differ() {
        let now = SystemTime::now();
        let (a, b) =
            (key().mint("a", "s", Duration::from_secs(60), now), key().mint("a", "s", Duration::from_secs(60), now));
        assert_ne!(a.id, b.id);
        assert_ne!(key().issued_claim(&a.id), key().issued_claim(&b.id));
        assert_eq!(key().issued_claim(&a.id), key().issued_claim(&a.id));
    }

    #[test]
    fn the_quota_counts_live_tokens_per_caller() {
        let q = Quota::default();
        let now = SystemTime::now();
        let at = |s| now + Duration::from_secs(s);
        assert!(q.admit("a", 2, now, at(10)).is_ok());
        assert!(q.admit("a", 2, now, at(20)).is_ok());
        assert_eq!(q.admit("a", 2, now, at(30)), Err(Duration::from_secs(10)));
        assert!(q.admit("b", 2, now, at(30)).is_ok(), "another caller has its own share");
        assert!(q.admit("a", 2, at(11), at(40)).is_ok(), "an expired token gives its place back");
    }

    #[test]
    fn callers_whose_tokens_expired_are_forgotten() {
        let q = Quota::default();
        let now = SystemTime::now();
        for i in 0..SWEEP_EVERY - 1 {
            q.admit(&format!("caller-{i}"), 1, now, now + Duration::from_secs(1)).unwrap();
        }
        let later = now + Duration::from_secs(2);
        q.admit("last", 1, later, later + Duration::from_secs(1)).unwrap();
        assert_eq!(q.live.lock().unwrap().by_actor.len(), 1, "only the live caller is kept");
    }
}
