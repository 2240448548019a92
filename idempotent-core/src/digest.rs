//! Digests of callers and keys: what stores and logs see instead of them.
//!
//! A store never sees an actor (the caller's identity, possibly a credential), only its digest;
//! a log never sees a client's key, only the start of its digest. By default these are plain
//! SHA-256 digests: fixed-size, not reversible, but a low-entropy actor (a short bearer token, an
//! account number) or key (an order number) can be confirmed by whoever reads the store or the
//! logs and guesses it, hashing candidates until one matches.
//!
//! With a server secret ([`DigestKey::new`], the builder's `digest_secret`), both are
//! HMAC-SHA256 under that secret instead: without the secret, a digest confirms nothing.
//!
//! ```
//! use idempotent_core::digest::DigestKey;
//!
//! let plain = DigestKey::default();
//! let keyed = DigestKey::new(b"a secret of the service, 32 bytes or more".as_slice());
//! assert_eq!(plain.actor("acct_1").len(), 64);
//! assert_ne!(plain.actor("acct_1"), keyed.actor("acct_1"));
//! assert_eq!(keyed.key("order-42").len(), 16);
//! ```
//!
//! # Rotating the secret
//! Records are filed under the actor's digest, so a new secret files every caller somewhere new:
//! records written under the old secret are no longer found. A retry that arrives after the
//! rotation for a request completed before it runs the handler again, and a request still
//! running under the old secret cannot be seen by its retries. Rotate the way a store is
//! migrated: stop (or drain) the instances, deploy the new secret to all of them at once, and
//! accept that replays of requests made before the rotation are gone (wait one route `ttl` with
//! the old secret after a suspected leak if those replays matter more than the exposure). The
//! operators' tools must be given the same secret as the servers to find a caller's record. The
//! key digests of logs change with it too, so logs from before and after do not correlate.
//!
//! The secret is never printed: `Debug` shows only whether one is set.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// The domain tag of actor digests.
const ACTOR_TAG: &[u8] = b"idempotent-actor/v1\0";
/// The domain tag of key digests (keyed only: the plain key digest is the bare SHA-256, as logs
/// have always shown it).
const KEY_TAG: &[u8] = b"idempotent-key/v1\0";

/// How actors and keys are digested: plain SHA-256 (the default), or HMAC-SHA256 under a server
/// secret. Cheap to clone.
#[derive(Clone, Default)]
pub struct DigestKey(Option<Arc<Hmac<Sha256>>>);

impl fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "DigestKey(secret)" } else { "DigestKey(none)" })
    }
}

impl DigestKey {
    /// Digests keyed by `secret` (any length; 32 random bytes or more is right for HMAC-SHA256).
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        // HMAC takes a key of any length: longer keys are hashed, shorter ones padded.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_ref()).expect("HMAC accepts keys of any length");
        Self(Some(Arc::new(mac)))
    }

    /// Whether a secret is set.
    pub fn is_keyed(&self) -> bool {
        self.0.is_some()
    }

    /// What stores see of `actor`: 64 lowercase hex characters; the empty string for the
    /// anonymous namespace (an empty actor).
    pub fn actor(&self, actor: &str) -> String {
        if actor.is_empty() {
            return String::new();
        }
        crate::hex(&self.tagged(ACTOR_TAG, actor.as_bytes()))
    }

    /// What logs and traces show of a client's key: the first 16 hex digits (64 bits) of its
    /// digest, enough to follow one key through the logs.
    pub fn key(&self, key: &str) -> String {
        match &self.0 {
            None => crate::hex(&Sha256::digest(key.as_bytes())[..8]),
            Some(_) => crate::hex(&self.tagged(KEY_TAG, key.as_bytes())[..8]),
        }
    }

    /// Arbitrary `data` under this key's secret with a domain `tag` (for values the server mints
    /// and checks itself). Plain SHA-256 over the tagged data without a secret.
    pub fn tagged(&self, tag: &[u8], data: &[u8]) -> [u8; 32] {
        match &self.0 {
            None => {
                let mut hasher = Sha256::new();
                hasher.update(tag);
                hasher.update(data);
                hasher.finalize().into()
            }
            Some(mac) => {
                let mut mac = (**mac).clone();
                mac.update(tag);
                mac.update(data);
                mac.finalize().into_bytes().into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_digests_are_the_ones_stores_and_logs_always_had() {
        let plain = DigestKey::default();
        assert_eq!(plain.actor("a"), crate::actor::digest("a"));
        assert_eq!(plain.key("order-42"), "3bf8b157c4238eef");
        assert_eq!(plain.actor(""), "");
        assert!(!plain.is_keyed());
    }

    #[test]
    fn a_secret_changes_every_digest_and_is_never_shown() {
        let (a, b) = (DigestKey::new("secret-a"), DigestKey::new("secret-b"));
        let plain = DigestKey::default();
        for digest in [|k: &DigestKey| k.actor("acct_1"), |k: &DigestKey| k.key("order-42")] {
            assert_ne!(digest(&a), digest(&plain));
            assert_ne!(digest(&a), digest(&b));
            assert_eq!(digest(&a), digest(&DigestKey::new("secret-a")), "stable for one secret");
        }
        assert_eq!(a.actor("acct_1").len(), 64);
        assert_eq!(a.actor(""), "", "the anonymous namespace stays empty");
        assert_eq!(format!("{a:?}"), "DigestKey(secret)");
        assert_eq!(format!("{plain:?}"), "DigestKey(none)");
        // RFC 4231 test case 2: the HMAC is HMAC-SHA256.
        let rfc = DigestKey::new("Jefe");
        let mac = rfc.tagged(b"", b"what do ya want for nothing?");
        assert_eq!(crate::hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
