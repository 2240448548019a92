//! Redis store (feature `redis`): a hot store shared by many instances, on a single node or on
//! Redis Cluster.
//!
//! # Connecting
//! - `redis://[user:password@]host:port[/db]`: one node, through a
//!   [`ConnectionManager`] that reconnects by itself after the
//!   server restarts or the connection drops.
//! - `redis+cluster://[user:password@]host1:port1,host2:port2,...`: Redis Cluster, through the
//!   async cluster connection, which discovers the slot map from any of the listed seed nodes
//!   and follows `MOVED`/`ASK` redirections. [`RedisStore::cluster`] takes the seed nodes as a
//!   list of `redis://` URLs instead.
//! - `rediss://...` and `rediss+cluster://host1:port1,...`: the same over TLS (feature `tls`),
//!   see [TLS](#tls).
//! - An application's own connection: [`RedisStore::from_connection_manager`] or
//!   [`RedisStore::from_cluster_connection`], so the store and the application share one client
//!   (one connection, one reconnection policy). The connection must come from the `redis` crate of
//!   major version 1, the one this crate re-exports as [`crate::redis`].
//!
//! Either URL form accepts a `?prefix=...` query parameter (see [`RedisStoreBuilder::prefix`]);
//! other query parameters are passed on to the `redis` crate.
//!
//! # TLS
//! With the cargo feature `tls` (of this crate, or of `idempotent-axum` / `idempotent-actix`),
//! `rediss://` connects to one node over TLS and `rediss+cluster://` to every node of a cluster
//! (seed nodes given to [`RedisStore::cluster`] as `rediss://` URLs do the same). Without the
//! feature such a specification is [`StoreError::Config`], saying which feature to enable; nothing
//! is ever sent in clear instead.
//!
//! The server's certificate is verified against the platform's root certificates (the CA bundle
//! of the host, e.g. `/etc/ssl/certs`, read by `rustls-native-certs`; the file named by the
//! `SSL_CERT_FILE` environment variable replaces them, as with OpenSSL), and must name the host
//! of the URL (an IP address in the URL needs an IP address in the certificate). A server whose
//! certificate does not verify is refused at [`build`](RedisStoreBuilder::build), with
//! [`StoreError::Unavailable`] whose message gives rustls's reason (`invalid peer certificate:
//! UnknownIssuer`, `certificate not valid for name ...`, `Expired`, ...) and says that it is
//! the server's TLS certificate that does not verify. For a private CA, or a test's,
//! `RedisStoreBuilder::root_certificate` trusts that CA instead of the platform's roots (a
//! specification string given to [`connect`](super::connect) cannot carry one: set
//! `SSL_CERT_FILE` for the process instead), and `RedisStoreBuilder::client_certificate`
//! presents a client certificate to a server that asks for one (`tls-auth-clients yes`, Redis's
//! default once TLS is on). The `#insecure` URL fragment (no verification) is refused: it needs
//! the `redis` crate's `tls-rustls-insecure`, which this crate does not enable.
//!
//! A cluster's nodes are reached at the addresses the cluster announces (`CLUSTER SLOTS`),
//! usually IP addresses, so each node's certificate must name the address its node announces,
//! not only the seed URL's host; `cluster-preferred-endpoint-type hostname` makes them announce
//! host names instead. Run the cluster with `tls-cluster yes` so that its bus is encrypted too.
//!
//! The `redis` crate asks rustls for the process's default cryptography provider. When the
//! application has not installed one, the store installs ring's (the one the `tls` feature builds
//! in) before its first TLS connection; an application that wants another (aws-lc-rs, a FIPS
//! build) installs it with `CryptoProvider::install_default` before connecting the store.
//!
//! # Timeouts and outages
//! The store fails closed: when Redis cannot answer, an operation fails with
//! [`StoreError::Unavailable`] (503 to the client) rather than hang or run the handler unprotected.
//! Every command of a connection the store opens has a response timeout and every connection
//! attempt a connection timeout (defaults [`DEFAULT_RESPONSE_TIMEOUT`] and
//! [`DEFAULT_CONNECTION_TIMEOUT`]; the reasons for each value are on the constants). A refused
//! connection (server stopped, port closed) fails at once. On a single node, a request that finds
//! the connection lost fails and starts one reconnection attempt in the background, without
//! retries or back-off sleeps; later requests use the new connection, or start another attempt,
//! so the same store instance works again as soon as the server is back, without being rebuilt.
//! The cluster connection retries a command up to three times (20 to 500 ms apart) while it
//! refreshes the slot map, within the same response timeout for the whole request.
//!
//! A timed-out claim is ambiguous (it may have been written): a retry then finds the key in
//! progress until the lease expires, and never runs the handler twice. A timed-out renewal has
//! usually been applied by a Redis that is slow rather than gone; the engine sends the next one a
//! sixth of a lease later. The rule that keeps a live claim alive through a renewal that timed out
//! is that a lease lasts at least six times the store operation timeout: the engine bounds every
//! store operation by its store timeout (1 s by default, the same as [`DEFAULT_RESPONSE_TIMEOUT`])
//! and refuses to start when a route's lease is shorter than six times it. Keep this store's
//! response timeout at most the engine's store timeout (a longer one is cut short by the engine
//! anyway); to give a slow Redis more time, raise both, and the leases with them.
//!
//! A peer that vanishes without a reset (a host that lost power, a network partition, a node
//! replaced behind the same address) leaves a half-open connection: every request sent on it
//! would wait the response timeout and fail with 503 until the kernel gives up retransmitting,
//! about 15 minutes on Linux. The connections the store opens therefore set TCP keepalive (a
//! first probe after 5 s without traffic, then one a second, three unanswered close it) and, on
//! Linux, `TCP_USER_TIMEOUT` of 5 s (data unacknowledged for 5 s, or probes unanswered past it,
//! close it): a vanished peer's connection is closed within about 6 s whether it was idle or
//! busy, and the next request reconnects, or the cluster client refreshes its slot map, instead
//! of queueing behind it. They also set `TCP_NODELAY`. [`RedisStore::tcp_settings`] gives the same
//! settings to an application's own connections.
//!
//! A connection of the application's keeps the settings it was built with: the store cannot
//! change its timeouts, its TCP settings or its reconnection policy.
//! [`RedisStoreBuilder::response_timeout`] then bounds each whole store operation on top of them,
//! so even a connection built without a response timeout fails closed. Build the application's [`ConnectionManager`] with
//! [`RedisStore::connection_manager_config`] to get the store's own policy (redis 1.x's default
//! retries a lost connection six times with exponential back-off, so during an outage every
//! request would wait for the store's timeout instead of failing at once), and do not share with
//! the store a connection that runs blocking commands (`BLPOP`, `XREAD BLOCK`, ...): on a
//! multiplexed connection they hold up every command behind them.
//!
//! # Key layout
//! One record is one Redis key: `{prefix}{<hex SHA-256 of the record key>}`, e.g.
//! `idem:{9f86d0...0a08}`, where the record key is the length-prefixed scope, actor and client key
//! ([`RecordKey::storage_key`]). The prefix (default `idem:`) separates applications sharing one
//! Redis; it may not contain `{` or `}`. Every operation touches exactly that one key (with a
//! [per-caller bound](#per-caller-bound), on a single node, also its actor's two accounting
//! keys), so records spread over all Cluster slots; the braces make the hash the key's hash tag,
//! so the slot never depends on the prefix. Client keys, actors and scopes never appear in Redis in clear.
//!
//! # Per-caller bound
//!
//! Off by default; [`RedisStoreBuilder::actor_max_bytes`] or `redis://...?actor_max_bytes=32MiB`
//! sets it, on a single node (the rule: [`quota`]). Each record counts
//! [`quota::record_bytes`] (256 bytes, the scope's, actor's and key's
//! characters, the encoded response once completed) until its lease (in progress) or its time to
//! live (completed) ends. The scripts keep the accounting of each bounded actor in two keys of
//! its own, `{prefix}a{<hex SHA-256 of the actor>}`, a sorted set of the actor's record keys
//! scored by the time each stops counting, and the same key with `:b`, a hash of their bytes
//! whose field `=` holds the total; both expire a second after the actor's last record stops
//! counting. The claim script takes out the records that stopped counting (at most 1000 per
//! claim), compares the total with the threshold the store computes from the bound
//! ([`quota::allowance`]), and refuses or takes the record in the same
//! script: atomic, so of concurrent claims of one actor exactly as many acquire as the bound
//! fits. Renew, complete, release and invalidate move or take out the record's entry in the same
//! scripts. Without a bound the scripts are those of a store without this setting and touch no
//! key but the record's; with one, no command is added (the accounting rides in the same
//! `EVALSHA`). A record deleted outside the store's scripts (by hand, or by a store opened without
//! the bound) counts until its time in the sorted set ends.
//!
//! Not on Redis Cluster: there a caller's records are spread over every slot (each record key's
//! hash tag is the hash of the whole record key, scope and client key included), and a script may
//! only touch keys of one slot, so no script can sum a caller's records and claim a record at
//! once; keeping the records of one caller in one slot would need another key layout, and would
//! put each caller's whole load on one node. A bound given for a cluster is refused at
//! [`build`](RedisStoreBuilder::build) with [`StoreError::Config`].
//!
//! # Value layout
//! A Redis hash with binary-safe fields:
//! - `s`: state, `p` (in progress) or `c` (completed);
//! - `f`: the 32-byte SHA-256 request fingerprint;
//! - `t`: the claim token (kept once completed: a completion sent again after its answer was
//!   lost recognises its own work);
//! - `l`: the lease deadline (in progress only), in decimal milliseconds since the Unix epoch by
//!   Redis's clock;
//! - `c`: when the record was claimed, the same way (for [`Store::inspect`]; records written by
//!   earlier versions have none);
//! - `r`: the response in [`StoredResponse::encode`]'s binary form (completed only).
//!
//! Time is Redis's own: the scripts read the lease deadline's clock with `TIME`, and the key's
//! expiry forgets records; no client clock, no sweeper. Redis 7 replicates a script by its effects
//! (the `HSET` of the deadline it computed), so a replica, an AOF replay and a promoted replica
//! hold the very same deadline.
//!
//! A claim holds its record until the record is completed or released, or until another claim
//! takes it over, which is only possible once `l` has passed (see
//! [who holds a record](super::Store#who-holds-a-record)): a worker slowed past its lease (a store
//! outage, a long pause) still renews, completes or releases it as long as nobody took it. So the
//! key of an in-progress record expires [`ABANDONED_CLAIM_RETENTION`] (10 minutes) after its lease
//! deadline, and each renewal moves both; the claim of a worker that crashed is taken over by the
//! first claim after `l`, with a new token and whatever its fingerprint, as if the key were
//! absent, and the record of a claim nobody takes again is forgotten by that expiry. A completed
//! record expires `ttl` after completion.
//!
//! A value under the prefix that is not such a hash (another type, missing or malformed fields,
//! bytes that do not decode, an in-progress record without a lease deadline or without expiry) is
//! [`StoreError::Corrupt`] and is never overwritten.
//!
//! # Round trips
//! Each operation is one `EVALSHA` of a Lua script, executed atomically by Redis: a first
//! execution costs two commands (claim, complete), a replay one (claim). The claim script creates
//! the in-progress record (`HSET` + `PEXPIRE`) when the key is absent or holds an in-progress
//! record whose lease deadline has passed, and otherwise answers the existing record's verdict:
//! `Mismatch` (fingerprint differs), `Completed` with the response bytes, or `InProgress` with the
//! remaining lease (`l` minus `TIME`). Renew, complete and release compare the token first and
//! then move `l` and the expiry, rewrite the record or `DEL` it; a token that does not match (or a
//! record that is gone) is [`StoreError::Fenced`] and nothing is written.
//!
//! A node that does not have a script cached (a restarted node, a replica just promoted: Redis
//! does not replicate its script cache) answers `NOSCRIPT`; the store then sends that one call
//! again as `EVAL` with the script's text, which runs it and caches it on that node. One more
//! round trip, once per script and node, to the node of the call's key only: unlike the `redis`
//! crate's own script invocation, which sends `SCRIPT LOAD` to every master of a cluster and fails
//! the call when any of them cannot answer, a node that lost its scripts after a failover does not
//! depend on the health of the others.
//!
//! # Operational requirements
//! - **Redis 7.0 or newer.** Renew, complete and release are scripts with Redis 7 flags
//!   (`#!lua flags=allow-oom`), which older servers cannot compile; and the scripts read `TIME`,
//!   which is sound because Redis 7 always replicates a script by its effects. On an older Redis
//!   every claim fails (503, "needs Redis 7.0 or newer") before any handler runs.
//! - **`maxmemory-policy` must be `noeviction`.** Eviction of a live claim lets a concurrent
//!   retry claim the key and run the handler while the first execution is still running; eviction
//!   of a completed record lets the next retry run it again. Every record of this store has an
//!   expiry, so a `volatile-*` policy (which evicts among keys with an expiry) is exactly as
//!   unsafe as an `allkeys-*` one; it is tolerable only on a Redis whose memory limit is never
//!   reached. With `noeviction` a full Redis refuses new claims (`OOM`), which this store reports
//!   as [`StoreError::Full`] (503): a request is refused rather than run twice. Work already
//!   claimed still finishes: renewal, completion and release run with the `allow-oom` script
//!   flag, so a handler that ran has its outcome stored (and replayed) instead of its claim
//!   lapsing and a retry running it again; replays and other claims that write nothing are
//!   answered too. Those writes take Redis past `maxmemory` by at most the responses of the
//!   requests in flight. Size `maxmemory` for the records kept over the longest `ttl`, or give the
//!   store a Redis of its own.
//! - **Persistence:** enable AOF (`appendonly yes`, `appendfsync everysec` or `always`). Without
//!   it a restart forgets every record, and every retry of an already executed request runs again.
//!   With `everysec`, up to about a second of records can be lost on a crash.
//! - **Failover:** Redis replication is asynchronous. A claim or a completion acknowledged by a
//!   primary that fails before the write reaches a replica is lost when that replica is promoted,
//!   and a retry then runs the handler again. This store cannot prevent that; `WAIT` narrows the
//!   window but does not close it. Where a second execution is unacceptable even across a
//!   failover, use the PostgreSQL store. Otherwise a failover costs availability only: a
//!   coordinated `CLUSTER FAILOVER` goes unnoticed by the store's requests (its first calls on the
//!   promoted node load the scripts there), and after a master is lost, requests on its slots fail
//!   with 503 until its replica is promoted (about `cluster-node-timeout` plus the election), then
//!   the same store works again. While the cluster client refreshes its slot map it checks every
//!   node, so a node that accepts connections but does not answer (a hung host) can hold
//!   requests up for one response timeout then.
//! - The cluster needs all 16384 slots covered (`cluster_state:ok`).

use super::{
    epoch_millis, quota, Claim, ClaimToken, Invalidated, Purge, RecordInfo, RecordKey, RecordState, Store, StoreError,
    ABANDONED_CLAIM_RETENTION,
};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::{Arg, Cmd, ErrorKind, IntoConnectionInfo, RedisError, Script, ServerErrorKind, ToRedisArgs, Value};
use sha2::{Digest, Sha256};
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// Default timeout of one connection attempt: 2 s.
///
/// Connecting to a Redis on the local network takes well under a millisecond, and a refused
/// connection fails at once whatever this is, so it only bounds how long requests wait on a
/// (re)connection to a host that does not answer (a partition, a host gone without a reset)
/// before they fail with [`StoreError::Unavailable`]. Two seconds lets one lost `SYN` be
/// retransmitted (Linux retransmits after one second) rather than failing the attempt.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Default timeout of one command's response: 1 s.
///
/// The engine bounds every store operation by its store timeout (`store_timeout`, 1 s by
/// default), renews a claim's lease every sixth of the lease, and refuses at start-up a lease
/// shorter than six times that timeout. This default is the same second, so the store gives up
/// on a command no later than the engine gives up on the operation, and the engine's default
/// settings hold for this store as they are. Twice the `redis` crate's own default (500 ms): a
/// Redis that is slow but alive (a fork for an AOF rewrite or a snapshot of a large data set, a
/// slow disk under `appendfsync`, another client's long script) mostly answers within it; one that
/// answers later fails a claim with 503 (the client retries) and a renewal with a warning (the next
/// one follows a sixth of a lease later, while the lease still runs). And it is the longest a
/// request waits for a Redis that has stopped answering before 503.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Claim: create the in-progress record, take over one whose lease deadline passed, or report the
/// existing one. KEYS[1] record, ARGV[1] fingerprint (32 bytes), ARGV[2] new token, ARGV[3] lease
/// (ms), ARGV[4] retention of an abandoned claim (ms).
///
/// No shebang: Redis runs it in compatibility mode, where a full Redis refuses its first write
/// (`OOM`, hence [`StoreError::Full`]) before anything changed, while a claim that only reads (a
/// replay, a conflict, a key in progress) is still answered. A shebang without `allow-oom` would
/// refuse replays too.
const CLAIM: &str = r#"
if not redis.REDIS_VERSION_NUM or redis.REDIS_VERSION_NUM < 458752 then
  -- 458752 is 0x070000: renew, complete and release need Redis 7's script flags. Refuse here,
  -- before any handler runs, rather than fail their completions.
  return redis.error_reply('ERR the idempotency store needs Redis 7.0 or newer')
end
local key = KEYS[1]
-- Redis's clock in milliseconds, read only where a lease is compared or set: a replay needs none.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function take(now)
  local lease = tonumber(ARGV[3])
  --{admit}
  -- HSET first: on a full Redis, the first write of the script is the one refused, before
  -- anything changed.
  redis.call('HSET', key, 's', 'p', 't', ARGV[2], 'f', ARGV[1], 'l', string.format('%d', now + lease),
    'c', string.format('%d', now))
  redis.call('PEXPIRE', key, string.format('%d', lease + tonumber(ARGV[4])))
  --{count}
  return {'a'}
end
local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then return take(clock()) end
if kind ~= 'hash' then return {'x', 'value of type ' .. kind} end
local v = redis.call('HMGET', key, 's', 'f', 't', 'r', 'l')
local s, f = v[1], v[2]
if not f or string.len(f) ~= 32 then return {'x', 'missing or malformed fingerprint'} end
if s == 'p' then
  if not v[3] then return {'x', 'in-progress record without token'} end
  local l = v[5]
  if not l or string.len(l) > 15 or not string.find(l, '^%d+$') then
    return {'x', 'in-progress record without a valid lease deadline'}
  end
  if redis.call('PTTL', key) < 0 then return {'x', 'in-progress record without expiry'} end
  local now = clock()
  local deadline = tonumber(l)
  -- This very claim, sent again after its answer was lost: it holds the record already, and
  -- takes it anew (a new lease) once its lease has run out.
  if v[3] == ARGV[2] then
    if deadline <= now then return take(now) end
    return {'a'}
  end
  -- Another request under the same key: never taken over, live or abandoned.
  if f ~= ARGV[1] then return {'m'} end
  if deadline <= now then return take(now) end
  return {'p', deadline - now}
elseif s == 'c' then
  if not v[4] then return {'x', 'completed record without response'} end
  if f ~= ARGV[1] then return {'m'} end
  return {'c', v[4]}
end
return {'x', 'unknown state'}
"#;

/// The per-caller accounting of a store with a bound ([`RedisStoreBuilder::actor_max_bytes`]),
/// put before the scripts of such a store (after their shebang); a call without those keys (an
/// anonymous caller's) skips it. KEYS[2] is the actor's sorted
/// set of record keys, each scored by the time (Redis's clock, ms) it stops counting; KEYS[3] the
/// hash of their bytes, whose field `=` is their total. `count` sets a record's time and bytes,
/// `uncount` takes it out; each writes its `HINCRBY` first, so that a full Redis refuses it before
/// anything changed. `prune` takes out up to 1000 records that stopped counting by `t`.
const ACCOUNT: &str = r#"
local function keep(t)
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if last[2] then
    local ms = string.format('%d', math.max(tonumber(last[2]) - t, 0) + 1000)
    redis.call('PEXPIRE', KEYS[2], ms)
    redis.call('PEXPIRE', KEYS[3], ms)
  end
end
local function count(member, score, bytes, t)
  if not KEYS[2] then return end
  local old = tonumber(redis.call('HGET', KEYS[3], member) or '0')
  redis.call('HINCRBY', KEYS[3], '=', string.format('%d', tonumber(bytes) - old))
  redis.call('HSET', KEYS[3], member, bytes)
  redis.call('ZADD', KEYS[2], string.format('%d', score), member)
  keep(t)
end
local function uncount(member)
  if not KEYS[2] then return end
  local old = redis.call('HGET', KEYS[3], member)
  if old then
    redis.call('HINCRBY', KEYS[3], '=', string.format('%d', -tonumber(old)))
    redis.call('HDEL', KEYS[3], member)
  end
  redis.call('ZREM', KEYS[2], member)
end
local function prune(t)
  if not KEYS[2] then return end
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', t, 'BYSCORE', 'LIMIT', 0, 1000)) do
    uncount(member)
  end
end
"#;

/// The claim's admission under a bound, at the start of `take(now)`: ARGV[5] is the most the actor
/// may hold and still claim ([`quota::allowance`], `-1` when nothing
/// fits), ARGV[6] the bytes of the claim. The key's own record, taken over, does not count. A
/// refusal answers `{'q', <ms until the earliest counted record stops counting>}`.
const CLAIM_ADMIT: &str = r#"if KEYS[2] then
    prune(now)
    local own = tonumber(redis.call('HGET', KEYS[3], key) or '0')
    local used = tonumber(redis.call('HGET', KEYS[3], '=') or '0') - own
    if used > tonumber(ARGV[5]) then
      local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      return {'q', first[2] and (tonumber(first[2]) - now) or 0}
    end
  end"#;

/// The claim's accounting under a bound, once it took the record: it counts until its lease ends.
const CLAIM_COUNT: &str = "count(key, now + lease, ARGV[6], now)";

/// Renew under a bound, ARGV[4] the claim's bytes: counts until the new lease ends.
const RENEW_COUNT: &str = "local lease = tonumber(ARGV[2])
local t = now()
                           redis.call('HSET', key, 'l', string.format('%d', t + lease))
                           redis.call('PEXPIRE', key, string.format('%d', lease + tonumber(ARGV[3])))
                           count(key, t + lease, ARGV[4], t)
return 1
";
/// Complete under a bound, ARGV[4] the completed record's bytes: counts until its time to live
/// ends.
const COMPLETE_COUNT: &str = "redis.call('HSET', key, 's', 'c', 'r', ARGV[2])
redis.call('HDEL', key, 'l')
                              redis.call('PEXPIRE', key, ARGV[3])
local t = now()
                              count(key, t + tonumber(ARGV[3]), ARGV[4], t)
return 1
";
/// Release under a bound.
const RELEASE_COUNT: &str = "redis.call('DEL', key)
uncount(key)
return 1
";

/// First line of the fenced scripts: Redis 7 lets them write on a full Redis (`maxmemory` reached
/// under `noeviction`), so work already claimed can finish while new claims are refused.
const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

/// Shared prelude of the fenced scripts: `held(token)` is 1 when `token` holds the key's claim,
/// whatever its lease deadline (it holds it until another claim takes it over), 2 when the record
/// is completed under `token`, 0 when `token` does not hold it (gone, completed by another token,
/// or another claim), -1 for a foreign type, -2 for a malformed record; `now()` is Redis's clock in
/// milliseconds. The script answers `--{done}` for a record completed under its token (1 for a
/// completion sent again, 0 for a renewal or a release), and `held`'s answer when it is not 1. A
/// record that holds a state costs one `HMGET`.
const HELD: &str = r#"
local key = KEYS[1]
local function now()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local function held(token)
  -- `HMGET` fails on a value of another type; a missing state is an absent key or a malformed hash.
  local v = redis.pcall('HMGET', key, 's', 't', 'l')
  if v.err then return -1 end
  if not v[1] then
    if redis.call('EXISTS', key) == 0 then return 0 end
    return -2
  end
  if v[1] == 'c' then
    if v[2] == token then return 2 end
    return 0
  end
  if v[1] ~= 'p' or not v[2] then return -2 end
  local l = v[3]
  if not l or string.len(l) > 15 or not string.find(l, '^%d+$') then return -2 end
  if v[2] ~= token then return 0 end
  return 1
end
local h = held(ARGV[1])
if h == 2 then return --{done} end
if h ~= 1 then return h end
"#;

/// Renew: ARGV[1] token, ARGV[2] lease (ms), ARGV[3] retention of an abandoned claim (ms).
const RENEW: &str = "local lease = tonumber(ARGV[2])\n\
                     redis.call('HSET', key, 'l', string.format('%d', now() + lease))\n\
                     redis.call('PEXPIRE', key, string.format('%d', lease + tonumber(ARGV[3])))\nreturn 1\n";
/// Complete: ARGV[1] token, ARGV[2] encoded response, ARGV[3] ttl (ms). The token stays in the
/// completed record, so that a completion sent again after its answer was lost (a cluster client
/// resends on a broken connection) finds its own work done instead of reporting a takeover.
const COMPLETE: &str = "redis.call('HSET', key, 's', 'c', 'r', ARGV[2])\nredis.call('HDEL', key, 'l')\n\
                        redis.call('PEXPIRE', key, ARGV[3])\nreturn 1\n";

/// Release: ARGV[1] token.
const RELEASE: &str = "redis.call('DEL', key)\nreturn 1\n";

/// Invalidate: deletes the record if ARGV[1] is `1` (whatever its state) or it is completed.
/// Answers 1 when it deleted it, 2 when it left a claim in progress alone, 0 when there was none.
/// `allow-oom`: deleting frees memory, and an operator may need it most on a full Redis.
const INVALIDATE: &str = r#"#!lua flags=allow-oom
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then return 0 end
if ARGV[1] ~= '1' then
  if kind ~= 'hash' then return redis.error_reply('ERR not an idempotency record') end
  if redis.call('HGET', key, 's') ~= 'c' then return 2 end
end
redis.call('DEL', key)
--{uncount}
return 1
"#;

/// Inspect: reads a record without changing it. Answers nil when the key is absent, `{'x'}` for a
/// value of another type, else the fields `s`, `l`, `c` and `r` (empty when missing), the key's
/// `PTTL` and Redis's clock in milliseconds.
const INSPECT: &str = r#"
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then return false end
if kind ~= 'hash' then return {'x'} end
local v = redis.call('HMGET', key, 's', 'l', 'c', 'r')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
return {v[1] or '', v[2] or '', v[3] or '', v[4] or '', redis.call('PTTL', key), now}
"#;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// `EVALSHA`, and on `NOSCRIPT` the script itself with `EVAL`, which runs it and caches it on
    /// that node. Both go to the node of the call's key, so a node without the script (restarted,
    /// or a replica just promoted) gets it without asking anything of the other nodes: the
    /// `redis` crate's own `ScriptInvocation` sends `SCRIPT LOAD` to every master of a cluster
    /// and fails the call when any of them does not answer.
    async fn invoke(&self, call: &Call<'_>) -> Result<Value, RedisError> {
        match self.query(&call.cmd).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => self.query(&call.eval()).await,
            other => other,
        }
    }
}

/// A Lua script and its SHA-1 digest (for `EVALSHA`).
#[derive(Clone)]
struct Lua {
    code: String,
    hash: String,
}

impl Lua {
    fn new(code: String) -> Self {
        let hash = Script::new(&code).get_hash().to_owned();
        Self { code, hash }
    }

    /// A call of this script on the record's key `record` and, under a per-caller bound, its
    /// actor's accounting keys; `data` is about how many bytes its arguments take.
    fn call<'a>(&'a self, record: &str, accounting: Option<&[String; 2]>, data: usize) -> Call<'a> {
        let keys = if accounting.is_some() { 3 } else { 1 };
        // Sized once: the name, the digest, the key count, the keys, and up to eight arguments.
        let mut cmd = Cmd::with_capacity(3 + keys + 8, 16 + self.hash.len() + record.len() + 160 + data);
        cmd.arg("EVALSHA").arg(self.hash.as_str()).arg(keys).arg(record);
        for key in accounting.into_iter().flatten() {
            cmd.arg(key.as_str());
        }
        Call { script: self, cmd, keys }
    }
}

/// One invocation of a script on its record's key (and, under a per-caller bound, its actor's
/// accounting keys): the `EVALSHA` command itself, its arguments written into it as they are
/// given.
struct Call<'a> {
    script: &'a Lua,
    /// `EVALSHA <hash> <n> <keys>... <args>...`.
    cmd: Cmd,
    /// How many keys it names.
    keys: usize,
}

impl Call<'_> {
    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.cmd.arg(arg);
        self
    }

    /// The same call as `EVAL <code> <n> <keys>... <args>...`, for a node that does not have the
    /// script.
    fn eval(&self) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(self.script.code.as_str());
        for arg in self.cmd.args_iter().skip(2) {
            if let Arg::Simple(bytes) = arg {
                cmd.arg(bytes);
            }
        }
        cmd
    }
}

/// Where a [`RedisStoreBuilder`] connects.
#[derive(Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
    /// A connection of the application's, used as it is.
    Given(Conn),
    Invalid(String),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Single(url) => f.debug_tuple("Single").field(&super::spec::Redacted(url)).finish(),
            Target::Cluster(nodes) => {
                let nodes: Vec<_> = nodes.iter().map(|n| super::spec::Redacted(n)).collect();
                f.debug_tuple("Cluster").field(&nodes).finish()
            }
            Target::Given(Conn::Single(_)) => f.write_str("ConnectionManager"),
            Target::Given(Conn::Cluster(_)) => f.write_str("ClusterConnection"),
            Target::Invalid(msg) => f.debug_tuple("Invalid").field(msg).finish(),
        }
    }
}

/// The certificates a [`RedisStoreBuilder`] adds to its TLS connections (feature `tls`).
#[derive(Clone, Default)]
struct TlsSettings {
    /// PEM of the CA certificates trusted instead of the platform's.
    root: Option<Vec<u8>>,
    /// PEM of the client's certificate chain and of its private key.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key, nor the certificates.
        f.debug_struct("TlsSettings")
            .field("root_certificate", &self.root.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl TlsSettings {
    /// Refuses certificates for a connection without TLS (`secure` false) rather than ignore
    /// them; before a TLS connection, makes sure rustls has a cryptography provider.
    fn check(&self, secure: bool) -> Result<(), StoreError> {
        if !secure && (self.root.is_some() || self.client.is_some()) {
            return Err(StoreError::Config(
                "a root or client certificate applies only to the `rediss://` and `rediss+cluster://` connections the store opens".into(),
            ));
        }
        #[cfg(feature = "tls")]
        {
            // Text without any PEM block would otherwise be an empty set of roots (every server
            // refused as `UnknownIssuer`) or an empty certificate chain.
            let no_block = |pem: Option<&[u8]>| pem.is_some_and(|pem| !holds_pem_certificate(pem));
            if no_block(self.root.as_deref()) || no_block(self.client.as_ref().map(|(cert, _)| cert.as_slice())) {
                return Err(StoreError::Config(
                    "the PEM of a root or client certificate holds no `CERTIFICATE` block".into(),
                ));
            }
            if secure {
                install_crypto_provider();
            }
        }
        Ok(())
    }

    /// The certificates in the `redis` crate's form, if any was given.
    #[cfg(feature = "tls")]
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.root.is_none() && self.client.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self
                .client
                .clone()
                .map(|(client_cert, client_key)| redis::ClientTlsConfig { client_cert, client_key }),
            root_cert: self.root.clone(),
        })
    }
}

/// Whether `pem` holds a `CERTIFICATE` block (a malformed one counts: the `redis` crate reports
/// it).
#[cfg(feature = "tls")]
fn holds_pem_certificate(pem: &[u8]) -> bool {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::pem_slice_iter(pem).next().is_some()
}

/// The `redis` crate builds its rustls configurations with the process's default cryptography
/// provider, which rustls picks by itself only when exactly one provider is compiled in (and
/// panics otherwise, e.g. when another crate of the application brings aws-lc-rs). Installs ring's,
/// which the `tls` feature builds in, unless the application installed one.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Fails only when another thread installed one meanwhile: that one is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Whether `url` is a TLS URL; [`StoreError::Config`] for one when the `tls` feature is off.
fn secure(url: &str) -> Result<bool, StoreError> {
    if !url.starts_with("rediss://") {
        return Ok(false);
    }
    if cfg!(feature = "tls") {
        Ok(true)
    } else {
        Err(StoreError::Config(
            "`rediss://` (Redis over TLS) needs the `tls` cargo feature (of idempotent-axum, idempotent-actix or idempotent-core)".into(),
        ))
    }
}

/// Settings of a [`RedisStore`] before it connects; from [`RedisStore::builder`],
/// [`RedisStore::cluster`], [`RedisStore::from_connection_manager`] or
/// [`RedisStore::from_cluster_connection`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    target: Target,
    prefix: Option<String>,
    connection_timeout: Duration,
    response_timeout: Duration,
    tls: TlsSettings,
    actor_max_bytes: Option<usize>,
}

impl RedisStoreBuilder {
    /// One caller's byte bound (default `None`: no per-caller bound; `Some(0)` is `None`),
    /// single node only: see [per-caller bound](self#per-caller-bound). Overrides an
    /// `actor_max_bytes` query parameter given to [`connect`](super::connect).
    pub fn actor_max_bytes(mut self, max_bytes: Option<usize>) -> Self {
        self.actor_max_bytes = max_bytes.filter(|n| *n > 0);
        self
    }

    /// Key prefix of this application's records (default [`DEFAULT_PREFIX`]); overrides a
    /// `prefix` query parameter. Applications sharing one Redis must use distinct prefixes. It may
    /// not contain `{` or `}`, which would change the keys' Cluster hash tag.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Timeout of one connection attempt (default [`DEFAULT_CONNECTION_TIMEOUT`]). It does not
    /// apply to a connection of the application's, which keeps its own.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Timeout of one command's response (default [`DEFAULT_RESPONSE_TIMEOUT`]); it bounds how
    /// long a request waits for an unresponsive Redis before failing with
    /// [`StoreError::Unavailable`]. Keep it well above the time to transfer the largest stored
    /// response, at most the engine's store timeout, and leases at least six times longer (see
    /// the [module documentation](self)).
    ///
    /// On a connection of the application's it bounds each whole store operation (one script
    /// invocation, with the script's reload after a server restart), on top of the connection's
    /// own timeouts.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks) for the
    /// servers' certificates on `rediss://` and `rediss+cluster://` connections, instead of the
    /// platform's root certificates: a private CA, or a test's (see [TLS](self#tls)). Given for a
    /// specification without TLS, or a connection of the application's, it makes
    /// [`build`](Self::build) fail with [`StoreError::Config`] rather than be ignored; malformed
    /// PEM fails there too.
    #[cfg(feature = "tls")]
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `certificate_pem`, with its private key `key_pem`
    /// (PKCS#8, PKCS#1 or SEC1 PEM), to servers that ask for one (mutual TLS: Redis's
    /// `tls-auth-clients yes`, its default once TLS is on). Like
    /// [`root_certificate`](Self::root_certificate), only for the TLS connections the store opens.
    #[cfg(feature = "tls")]
    pub fn client_certificate(mut self, certificate_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.client = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// Connects. An invalid specification or prefix is [`StoreError::Config`]; a server that
    /// cannot be reached, or whose TLS certificate does not verify, is
    /// [`StoreError::Unavailable`]. A connection of the application's is used as it is, without a
    /// round trip.
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        let (target, query_prefix) = match self.target {
            Target::Invalid(msg) => return Err(StoreError::Config(msg)),
            Target::Given(conn) => (Target::Given(conn), None),
            Target::Single(url) => {
                let (url, prefix) = split_prefix(&url);
                (Target::Single(url), prefix)
            }
            Target::Cluster(nodes) => {
                let mut prefix = None;
                let nodes = nodes
                    .iter()
                    .map(|n| {
                        let (url, p) = split_prefix(n);
                        prefix = prefix.take().or(p);
                        url
                    })
                    .collect();
                (Target::Cluster(nodes), prefix)
            }
        };
        let prefix = self.prefix.or(query_prefix).unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Config(format!("redis key prefix `{prefix}` may not contain `{{` or `}}`")));
        }
        let cluster = matches!(target, Target::Cluster(_) | Target::Given(Conn::Cluster(_)));
        if cluster && self.actor_max_bytes.is_some() {
            return Err(StoreError::Config(
                "a per-caller bound (`actor_max_bytes`) needs a single Redis node: on Redis Cluster a caller's records lie in every slot, and no script can sum them atomically (see the store's docs)".into(),
            ));
        }
        let (conn, deadline) = match target {
            Target::Single(url) => {
                self.tls.check(secure(&url)?)?;
                let info = url.as_str().into_connection_info().map_err(config)?;
                let info = info.set_tcp_settings(RedisStore::tcp_settings());
                #[cfg(feature = "tls")]
                let client = match self.tls.certificates() {
                    Some(certificates) => redis::Client::build_with_tls(info, certificates),
                    None => redis::Client::open(info),
                };
                #[cfg(not(feature = "tls"))]
                let client = redis::Client::open(info);
                let client = client.map_err(config)?;
                let cfg = RedisStore::connection_manager_config()
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_response_timeout(Some(self.response_timeout));
                (Conn::Single(ConnectionManager::new_with_config(client, cfg).await.map_err(connect_failure)?), None)
            }
            Target::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(StoreError::Config("redis cluster specification lists no node".into()));
                }
                let mut secure_nodes = false;
                for node in &nodes {
                    secure_nodes |= secure(node)?;
                }
                self.tls.check(secure_nodes)?;
                let builder = ClusterClientBuilder::new(nodes);
                #[cfg(feature = "tls")]
                let builder = match self.tls.certificates() {
                    Some(certificates) => builder.certs(certificates),
                    None => builder,
                };
                let client = builder
                    .tcp_settings(RedisStore::tcp_settings())
                    .connection_timeout(self.connection_timeout)
                    // Per node command; and, explicitly, for the whole request with its retries
                    // and redirections (redis 1.x's default, stated so it does not drift): a
                    // cluster request never waits longer than one response timeout before 503.
                    .response_timeout(self.response_timeout)
                    .overall_response_timeout(Some(self.response_timeout))
                    // A few quick retries while the slot map is refreshed after `MOVED` or a
                    // dropped node connection, instead of the default 16 with waits of seconds
                    // that the overall timeout would cut short anyway.
                    .retries(3)
                    .min_retry_wait(20)
                    .max_retry_wait(500)
                    .build()
                    .map_err(config)?;
                (Conn::Cluster(client.get_async_connection().await.map_err(connect_failure)?), None)
            }
            Target::Given(conn) => {
                self.tls.check(false)?;
                (conn, Some(self.response_timeout))
            }
            Target::Invalid(_) => unreachable!("handled above"),
        };
        let [claim, renew, complete, release, inspect, invalidate] = scripts(self.actor_max_bytes.is_some());
        Ok(RedisStore {
            cluster: matches!(conn, Conn::Cluster(_)),
            conn,
            deadline,
            prefix,
            actor_max_bytes: self.actor_max_bytes,
            claim: Lua::new(claim),
            renew: Lua::new(renew),
            complete: Lua::new(complete),
            release: Lua::new(release),
            inspect: Lua::new(inspect),
            invalidate: Lua::new(invalidate),
        })
    }
}

/// The scripts of a store, with (`bounded`) or without a per-caller bound: claim, renew,
/// complete, release, inspect, invalidate. With a bound, every one but `inspect` keeps the
/// actor's accounting; without one, they touch nothing but the record's key.
fn scripts(bounded: bool) -> [String; 6] {
    let account = if bounded { ACCOUNT } else { "" };
    let pick = |plain: &str, counted: &str| if bounded { counted.to_owned() } else { plain.to_owned() };
    let claim = CLAIM
        .replace("--{admit}", if bounded { CLAIM_ADMIT } else { "" })
        .replace("--{count}", if bounded { CLAIM_COUNT } else { "" });
    let invalidate = INVALIDATE.replace("--{uncount}", if bounded { "uncount(key)" } else { "" });
    // The shebang stays the first line.
    let invalidate = invalidate.replacen('\n', &format!("\n{account}"), 1);
    [
        format!("{account}{claim}"),
        // A completion sent again after its answer was lost finds its own work done (1); a renewal
        // or a release of a completed record is fenced (0).
        format!("{ALLOW_OOM}{account}{}{}", HELD.replace("--{done}", "0"), pick(RENEW, RENEW_COUNT)),
        format!("{ALLOW_OOM}{account}{}{}", HELD.replace("--{done}", "1"), pick(COMPLETE, COMPLETE_COUNT)),
        format!("{ALLOW_OOM}{account}{}{}", HELD.replace("--{done}", "0"), pick(RELEASE, RELEASE_COUNT)),
        INSPECT.to_owned(),
        invalidate,
    ]
}

/// A [`Store`] on Redis or Redis Cluster; see the [module documentation](self) for the key
/// layout, the scripts and the operational requirements.
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// Bound of each whole operation, on a connection of the application's.
    deadline: Option<Duration>,
    cluster: bool,
    prefix: String,
    /// One caller's byte bound: the scripts keep each actor's accounting.
    actor_max_bytes: Option<usize>,
    claim: Lua,
    renew: Lua,
    complete: Lua,
    release: Lua,
    inspect: Lua,
    invalidate: Lua,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore").field("cluster", &self.cluster).field("prefix", &self.prefix).finish()
    }
}

impl RedisStore {
    /// Connects with default settings to `spec`: `redis://...` for one node or
    /// `redis+cluster://host1:port1,host2:port2,...` for Redis Cluster; `rediss://...` and
    /// `rediss+cluster://...` for the same over TLS (feature `tls`, see [TLS](self#tls)).
    pub async fn connect(spec: &str) -> Result<Self, StoreError> {
        Self::builder(spec).build().await
    }

    /// Settings for `spec` (`redis://...`, `redis+cluster://...`, or over TLS `rediss://...`,
    /// `rediss+cluster://...`), to adjust before [`build`](RedisStoreBuilder::build).
    pub fn builder(spec: &str) -> RedisStoreBuilder {
        Self::with_target(parse_spec(spec))
    }

    /// Settings for Redis Cluster reached through `nodes`, each a `redis://host:port` URL of a
    /// seed node (one reachable node is enough to discover the others), or `rediss://host:port`
    /// over TLS (feature `tls`).
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> RedisStoreBuilder {
        Self::with_target(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// Settings for a store on the application's own single-node [`ConnectionManager`], from the
    /// `redis` crate of major version 1 ([`crate::redis`]). The store uses (a clone of) it as it
    /// is: its timeouts and reconnection policy stay the application's, see the
    /// [module documentation](self); [`RedisStore::connection_manager_config`] gives the store's.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// use idempotent_core::redis::{self, aio::ConnectionManager};
    /// use idempotent_core::store::RedisStore;
    ///
    /// use idempotent_core::redis::IntoConnectionInfo;
    ///
    /// let info = "redis://127.0.0.1:6379".into_connection_info()?.set_tcp_settings(RedisStore::tcp_settings());
    /// let client = redis::Client::open(info)?;
    /// let manager = ConnectionManager::new_with_config(client, RedisStore::connection_manager_config()).await?;
    /// let store = RedisStore::from_connection_manager(manager.clone()).prefix("payments:").build().await?;
    /// // `manager` keeps serving the application's own commands.
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection_manager(manager: ConnectionManager) -> RedisStoreBuilder {
        Self::with_target(Target::Given(Conn::Single(manager)))
    }

    /// Settings for a store on the application's own Redis Cluster connection, from the `redis`
    /// crate of major version 1 ([`crate::redis`]). The store uses (a clone of) it as it is. Build
    /// it with a response timeout (`ClusterClientBuilder::response_timeout`): without one, the
    /// cluster client waits for a node indefinitely and only the store's own bound
    /// ([`RedisStoreBuilder::response_timeout`]) turns a silent node into 503; and with the
    /// store's TCP settings (`ClusterClientBuilder::tcp_settings(RedisStore::tcp_settings())`).
    pub fn from_cluster_connection(connection: ClusterConnection) -> RedisStoreBuilder {
        Self::with_target(Target::Given(Conn::Cluster(connection)))
    }

    /// The single-node [`ConnectionManager`] settings of the stores this crate connects itself:
    /// the default timeouts ([`DEFAULT_CONNECTION_TIMEOUT`], [`DEFAULT_RESPONSE_TIMEOUT`]) and
    /// no reconnection retries. Build an application's manager with it to share the store's
    /// fail-fast behaviour, adjusting with the `redis` crate's setters where needed.
    pub fn connection_manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_CONNECTION_TIMEOUT))
            .set_response_timeout(Some(DEFAULT_RESPONSE_TIMEOUT))
            // One connection attempt per reconnection, no back-off sleeps (redis 1.x's default
            // is six retries, 100 ms doubling with jitter): a request that finds the server gone
            // fails with `Unavailable` at once (about a millisecond for a refused connection)
            // instead of waiting through the retries, and the next request tries again.
            .set_number_of_retries(0)
    }

    /// The TCP settings of the connections this crate opens (single node and cluster nodes):
    /// `TCP_NODELAY`, keepalive probes after 5 s idle then every second, and on Linux a
    /// `TCP_USER_TIMEOUT` of 5 s, so that the kernel drops a connection whose peer vanished
    /// without a reset in seconds (see the [module documentation](self)). Give them to the
    /// application's own connections with `ConnectionInfo::set_tcp_settings` (single node) or
    /// `ClusterClientBuilder::tcp_settings`.
    pub fn tcp_settings() -> TcpSettings {
        // First probe after 5 s without traffic.
        let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(5));
        // Then one a second; three unanswered close the connection (Linux closes it by the user
        // timeout below instead, at the first probe past it).
        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd",
            target_os = "netbsd",
            target_os = "windows"
        ))]
        let keepalive = keepalive.with_interval(Duration::from_secs(1)).with_retries(3);
        // Nagle's algorithm would hold a small command back while an earlier one of the same
        // multiplexed connection awaits its acknowledgement.
        let settings = TcpSettings::default().set_nodelay(true).set_keepalive(keepalive);
        // Data sent and not acknowledged for 5 s closes the connection, instead of the kernel
        // retransmitting for about 15 minutes.
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        let settings = settings.set_user_timeout(Duration::from_secs(5));
        settings
    }

    fn with_target(target: Target) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target,
            prefix: None,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            tls: TlsSettings::default(),
            actor_max_bytes: None,
        }
    }

    /// The keys of `key`'s actor's accounting, under a per-caller bound that applies to it
    /// (none for the anonymous actor, or without a bound):
    /// `{prefix}a{<hex SHA-256 of the actor>}` (the sorted set) and the same with `:b` (the hash
    /// of bytes).
    fn accounting(&self, key: &RecordKey) -> Option<[String; 2]> {
        self.actor_max_bytes.filter(|_| !quota::exempt(&key.actor))?;
        let mut set = format!("{}a{{", self.prefix);
        crate::push_hex(&mut set, &Sha256::digest(key.actor.as_bytes()));
        set.push('}');
        let bytes = format!("{set}:b");
        Some([set, bytes])
    }

    /// A call of `script` on `key`'s record, with its actor's accounting keys when it has some;
    /// `data` is about how many bytes its arguments take.
    fn call<'a>(&self, script: &'a Lua, key: &RecordKey, data: usize) -> Call<'a> {
        script.call(&self.redis_key(key), self.accounting(key).as_ref(), data)
    }

    /// The key prefix of this store's records.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the store talks to Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The Redis key that holds `key`'s record: `{prefix}{<hex SHA-256 of the record key>}`.
    pub fn redis_key(&self, key: &RecordKey) -> String {
        redis_key(&self.prefix, key)
    }

    /// Runs one script invocation, within the store's own bound on an application's connection.
    async fn invoke(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        self.bounded(self.conn.invoke(call)).await
    }

    /// Runs one command, within the same bound.
    async fn command(&self, cmd: Cmd) -> Result<Value, StoreError> {
        self.bounded(self.conn.query(&cmd)).await
    }

    async fn bounded(&self, run: impl Future<Output = Result<Value, RedisError>>) -> Result<Value, StoreError> {
        match self.deadline {
            None => run.await.map_err(unavailable),
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(r) => r.map_err(unavailable),
                Err(_) => Err(StoreError::Unavailable(format!("redis did not answer within {limit:?}"))),
            },
        }
    }

    async fn fenced(&self, call: &Call<'_>) -> Result<(), StoreError> {
        match self.invoke(call).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::Fenced),
            Value::Int(-1) => {
                Err(StoreError::Corrupt("a value of another type is stored under the record's key".into()))
            }
            Value::Int(-2) => Err(StoreError::Corrupt("record without a valid state or token".into())),
            other => Err(StoreError::Corrupt(format!("unexpected script reply {other:?}"))),
        }
    }
}

fn redis_key(prefix: &str, key: &RecordKey) -> String {
    let digest = Sha256::digest(key.storage_key().as_bytes());
    let mut out = String::with_capacity(prefix.len() + 66);
    out.push_str(prefix);
    out.push('{');
    crate::push_hex(&mut out, &digest);
    out.push('}');
    out
}

/// The longest duration the scripts are given: 2^43 ms, about 278 years. Redis's clock plus a
/// lease, plus the retention, stays an exact integer in Lua's doubles and a valid `PEXPIRE`.
const MAX_MILLIS: u64 = 1 << 43;

/// Milliseconds for the scripts, at least 1 (a `PEXPIRE` of 0 would delete the key) and at most
/// [`MAX_MILLIS`].
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(MAX_MILLIS).clamp(1, MAX_MILLIS)
}

fn parse_spec(spec: &str) -> Target {
    let cluster = match spec.strip_prefix("redis+cluster://") {
        Some(rest) => Some(("redis://", rest)),
        None => spec.strip_prefix("rediss+cluster://").map(|rest| ("rediss://", rest)),
    };
    if let Some((scheme, rest)) = cluster {
        let (main, query) = match rest.split_once('?') {
            Some((m, q)) => (m, Some(q)),
            None => (rest, None),
        };
        let (auth, hosts) = match main.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, main),
        };
        let hosts = hosts.trim_end_matches('/');
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                let mut url = String::from(scheme);
                if let Some(a) = auth {
                    url.push_str(a);
                    url.push('@');
                }
                url.push_str(h);
                if let Some(q) = query {
                    url.push_str("/?");
                    url.push_str(q);
                }
                url
            })
            .collect();
        if nodes.is_empty() {
            return Target::Invalid(format!("`{}` lists no cluster node", super::spec::redact(spec)));
        }
        Target::Cluster(nodes)
    } else if ["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|s| spec.starts_with(s)) {
        Target::Single(spec.to_owned())
    } else {
        Target::Invalid(format!(
            "`{}` is not a Redis URL: use `redis://host:port` or `redis+cluster://host1:port1,host2:port2` (`rediss` for TLS)",
            super::spec::redact(spec)
        ))
    }
}

/// Removes a `prefix=` query parameter from `url` and returns it.
fn split_prefix(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), None) };
    let mut prefix = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("prefix=") {
            Some(p) => {
                prefix = Some(p.to_owned());
                false
            }
            None => !kv.is_empty(),
        })
        .collect();
    let url =
        if rest.is_empty() { base.trim_end_matches('/').to_owned() } else { format!("{base}?{}", rest.join("&")) };
    (url, prefix)
}

fn config(e: RedisError) -> StoreError {
    StoreError::Config(e.to_string())
}

/// Classifies a failed operation: Redis's `OOM` error (a full Redis under `noeviction`) is
/// [`StoreError::Full`]; anything else (a refused, dropped or timed-out connection, a cluster
/// that cannot serve the slot, any other server error) is [`StoreError::Unavailable`], so the
/// request fails closed.
fn unavailable(e: RedisError) -> StoreError {
    // redis 1.x has no error kind for `OOM`: it is an extension error whose code is the first
    // word of the server's reply.
    if e.code() == Some("OOM") {
        return StoreError::Full;
    }
    StoreError::Unavailable(e.to_string())
}

/// A failed first connection: [`StoreError::Config`] for settings the `redis` crate refuses
/// (e.g. `#insecure`), else [`unavailable`], with what a TLS failure means.
fn connect_failure(e: RedisError) -> StoreError {
    if e.kind() == ErrorKind::InvalidClientConfig {
        return config(e);
    }
    match unavailable(e) {
        StoreError::Unavailable(detail) => StoreError::Unavailable(super::explain_tls(
            detail,
            "one given to `RedisStoreBuilder::root_certificate`",
            "`RedisStoreBuilder::client_certificate`",
        )),
        other => other,
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn decode_claim(reply: Value, token: ClaimToken) -> Result<Claim, StoreError> {
    let unexpected = |r: &Value| StoreError::Corrupt(format!("unexpected claim reply {r:?}"));
    let Value::Array(items) = &reply else { return Err(unexpected(&reply)) };
    let tag = items.first().and_then(bytes).ok_or_else(|| unexpected(&reply))?;
    match (tag, items.get(1)) {
        (b"a", None) => Ok(Claim::Acquired(token)),
        (b"m", None) => Ok(Claim::Mismatch),
        (b"p", Some(Value::Int(ms))) => {
            Ok(Claim::InProgress { retry_after: Duration::from_millis(u64::try_from(*ms).unwrap_or(0)) })
        }
        (b"c", Some(r)) => {
            let raw = bytes(r).ok_or_else(|| unexpected(&reply))?;
            StoredResponse::decode(raw).map(Claim::Completed).map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        (b"q", Some(Value::Int(ms))) => Err(StoreError::QuotaExceeded {
            retry_after: quota::retry_after(Duration::from_millis(u64::try_from(*ms).unwrap_or(0))),
        }),
        (b"x", Some(why)) => {
            Err(StoreError::Corrupt(String::from_utf8_lossy(bytes(why).unwrap_or(b"malformed record")).into_owned()))
        }
        _ => Err(unexpected(&reply)),
    }
}

/// Reads the inspect script's reply.
fn decode_inspect(reply: &Value) -> Result<Option<RecordInfo>, StoreError> {
    let unexpected = || StoreError::Corrupt(format!("unexpected inspect reply {reply:?}"));
    let items = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        _ => return Err(unexpected()),
    };
    let text = |i: usize| items.get(i).and_then(bytes).ok_or_else(unexpected);
    let int = |i: usize| match items.get(i) {
        Some(Value::Int(n)) => Ok(*n),
        _ => Err(unexpected()),
    };
    let millis = |raw: &[u8]| std::str::from_utf8(raw).ok().and_then(|t| t.parse::<i64>().ok());
    if text(0)? == b"x" && items.len() == 1 {
        return Err(StoreError::Corrupt("a value of another type is stored under the record's key".into()));
    }
    let created_at = millis(text(2)?).map(epoch_millis);
    let (state, status, expires) = match text(0)? {
        b"p" => {
            let deadline = millis(text(1)?)
                .ok_or_else(|| StoreError::Corrupt("in-progress record without a valid lease deadline".into()))?;
            (RecordState::InProgress, None, deadline)
        }
        b"c" => {
            let stored = StoredResponse::decode(text(3)?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            (RecordState::Completed, Some(stored.status), int(5)?.saturating_add(int(4)?.max(0)))
        }
        _ => return Err(StoreError::Corrupt("record without a valid state".into())),
    };
    Ok(Some(RecordInfo { state, status, created_at, expires_at: epoch_millis(expires) }))
}

#[async_trait]
impl Store for RedisStore {
    async fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        token: &ClaimToken,
    ) -> Result<Claim, StoreError> {
        let call = self
            .call(&self.claim, key, 0)
            .arg(&fingerprint.0[..])
            .arg(token.0.as_str())
            .arg(millis(lease))
            .arg(millis(ABANDONED_CLAIM_RETENTION));
        let call = match self.actor_max_bytes {
            // The anonymous actor's claims take no accounting keys, and always fit.
            Some(max) => {
                let need = quota::record_bytes(key, 0);
                let allowance = if call.keys > 1 { quota::allowance(need, max) } else { Some(usize::MAX) };
                let allowance = allowance.map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX));
                call.arg(allowance).arg(need)
            }
            None => call,
        };
        let reply = self.invoke(&call).await?;
        decode_claim(reply, token.clone())
    }

    async fn renew(&self, key: &RecordKey, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        let call = self
            .call(&self.renew, key, 0)
            .arg(token.0.as_str())
            .arg(millis(lease))
            .arg(millis(ABANDONED_CLAIM_RETENTION));
        let call = if self.actor_max_bytes.is_some() { call.arg(quota::record_bytes(key, 0)) } else { call };
        self.fenced(&call).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: &ClaimToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let encoded = response.encode();
        let bytes = quota::record_bytes(key, encoded.len());
        let call = self.call(&self.complete, key, encoded.len()).arg(token.0.as_str()).arg(encoded).arg(millis(ttl));
        let call = if self.actor_max_bytes.is_some() { call.arg(bytes) } else { call };
        self.fenced(&call).await
    }

    async fn release(&self, key: &RecordKey, token: &ClaimToken) -> Result<(), StoreError> {
        let call = self.call(&self.release, key, 0).arg(token.0.as_str());
        self.fenced(&call).await
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let reply = self.invoke(&self.inspect.call(&self.redis_key(key), None, 0)).await?;
        decode_inspect(&reply)
    }

    async fn invalidate(&self, key: &RecordKey, purge: Purge) -> Result<Invalidated, StoreError> {
        let any = if purge == Purge::Any { "1" } else { "0" };
        match self.invoke(&self.call(&self.invalidate, key, 0).arg(any)).await? {
            Value::Int(1) => Ok(Invalidated::Deleted),
            Value::Int(2) => Ok(Invalidated::InProgress),
            Value::Int(0) => Ok(Invalidated::Absent),
            other => Err(StoreError::Corrupt(format!("unexpected invalidate reply {other:?}"))),
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.command(redis::cmd("PING")).await.map(drop)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a bound the scripts name no key but the record's (a cluster needs that, and a
    /// store without a bound pays nothing for the feature); with one, each but `inspect` keeps
    /// the accounting, and the shebangs stay first.
    #[test]
    fn only_a_bound_puts_accounting_in_the_scripts() {
        for script in scripts(false) {
            assert!(!script.contains("KEYS[2]") && !script.contains("count(") && !script.contains("--{"), "{script}");
        }
        let bounded = scripts(true);
        for (i, script) in bounded.iter().enumerate() {
            assert_eq!(script.contains("KEYS[2]"), i != 4, "{script}");
            assert!(!script.contains("--{"), "{script}");
            assert!(!script.contains("#!lua") || script.starts_with("#!lua"), "{script}");
        }
        assert!(bounded[0].contains("prune(now)") && bounded[0].contains("count(key, now + lease"));
        assert!(bounded[5].contains("uncount(key)"));
    }

    /// The builder's `Debug` and every message about a specification show it without its
    /// password.
    #[test]
    fn passwords_stay_out_of_debug_and_errors() {
        for spec in ["redis://:hunter2@h:1", "redis+cluster://u:hunter2@h1:1,h2:2", "rediss://u:hunter2@h:1/0"] {
            let shown = format!("{:?}", RedisStore::builder(spec));
            assert!(!shown.contains("hunter2") && shown.contains("***"), "{shown}");
        }
        for spec in ["redis+cluster://:hunter2@/", "http://:hunter2@h:1"] {
            let Target::Invalid(message) = parse_spec(spec) else { panic!("{spec}") };
            assert!(!message.contains("hunter2") && message.contains("***"), "{message}");
        }
    }

    #[test]
    fn cluster_specs_become_node_urls() {
        let Target::Cluster(nodes) = parse_spec("redis+cluster://:pw@h1:1,h2:2/?prefix=app:") else { panic!() };
        assert_eq!(nodes, ["redis://:pw@h1:1/?prefix=app:", "redis://:pw@h2:2/?prefix=app:"]);
        assert_eq!(split_prefix(&nodes[0]), ("redis://:pw@h1:1".to_owned(), Some("app:".to_owned())));
        assert_eq!(
            split_prefix("redis://h/0?protocol=resp3&prefix=x:"),
            ("redis://h/0?protocol=resp3".to_owned(), Some("x:".to_owned()))
        );
        assert!(matches!(parse_spec("redis+cluster://"), Target::Invalid(_)));
        let Target::Cluster(nodes) = parse_spec("rediss+cluster://u:pw@h1:1,h2:2") else { panic!() };
        assert_eq!(nodes, ["rediss://u:pw@h1:1", "rediss://u:pw@h2:2"]);
        assert!(matches!(parse_spec("rediss://h:1"), Target::Single(_)));
        assert!(matches!(parse_spec("http://h:1"), Target::Invalid(_)));
    }

    /// Without the `tls` feature a TLS specification is refused with the feature to enable, never
    /// connected in clear; with it, certificates for a connection without TLS are refused.
    #[tokio::test]
    async fn tls_specifications_need_the_feature() {
        for spec in ["rediss://127.0.0.1:1", "rediss+cluster://127.0.0.1:1,127.0.0.1:2"] {
            let result = RedisStore::connect(spec).await;
            if cfg!(feature = "tls") {
                // Nothing listens there: the feature is on, so it tried to connect.
                assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
            } else {
                let Err(StoreError::Config(msg)) = result else { panic!("{result:?}") };
                assert!(msg.contains("`tls` cargo feature"), "{msg}");
            }
        }
        let result = RedisStore::cluster(["rediss://127.0.0.1:1"]).build().await;
        if cfg!(feature = "tls") {
            assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        } else {
            assert!(matches!(result, Err(StoreError::Config(_))), "{result:?}");
        }
        #[cfg(feature = "tls")]
        for builder in [
            RedisStore::builder("redis://127.0.0.1:1").root_certificate(&b"pem"[..]),
            RedisStore::builder("redis+cluster://127.0.0.1:1").client_certificate(&b"c"[..], &b"k"[..]),
        ] {
            let Err(StoreError::Config(msg)) = builder.build().await else { panic!("certificates without TLS") };
            assert!(msg.contains("rediss://"), "{msg}");
        }
    }

    #[test]
    fn keys_are_prefixed_hash_tags() {
        let k = RecordKey::new("s", "a", "k");
        let digest = Sha256::digest(k.storage_key().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(redis_key("idem:", &k), format!("idem:{{{hex}}}"));
        assert_ne!(redis_key("idem:", &k), redis_key("idem:", &RecordKey::new("s", "b", "k")));
    }

    #[test]
    fn server_errors_are_classified() {
        let reply = |raw: &[u8]| redis::parse_redis_value(raw).unwrap().extract_error().unwrap_err();
        let oom = reply(b"-OOM command not allowed when used memory > 'maxmemory'. script: x, on @user_script:4.\r\n");
        assert!(matches!(unavailable(oom), StoreError::Full));
        for other in [&b"-ERR unknown command\r\n"[..], b"-NOSCRIPT No matching script\r\n", b"-CLUSTERDOWN down\r\n"] {
            assert!(matches!(unavailable(reply(other)), StoreError::Unavailable(_)));
        }
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(unavailable(refused), StoreError::Unavailable(_)));
    }

    #[test]
    fn millis_never_zero() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
        assert_eq!(millis(Duration::from_secs(400 * 365 * 86_400)), MAX_MILLIS);
    }
}
