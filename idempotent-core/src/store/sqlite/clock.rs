//! The clocks a SQLite store reads: the wall clock for what must outlive the host's uptime (the
//! time to live of completed records, the times `inspect` reports), and the host's monotonic
//! clock for leases, which a step of the wall clock must not move (see "Clock" in the
//! [store's docs](super)).

use std::fmt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The clocks a [`SqliteStore`](super::SqliteStore) reads. [`SystemClock`], the default, reads
/// the system's; another is for tests ([`SqliteConfig::clock`](super::SqliteConfig::clock)),
/// to step the wall clock or to play another boot of the host.
pub trait SqliteClock: fmt::Debug + Send + Sync + 'static {
    /// Milliseconds since the Unix epoch on the wall clock.
    fn wall_ms(&self) -> i64;

    /// The boot of the host that [`monotonic_ms`](Self::monotonic_ms) counts from (on Linux,
    /// `/proc/sys/kernel/random/boot_id`); `None` where there is no monotonic clock shared by the
    /// host's processes, and leases then follow the wall clock.
    fn boot_id(&self) -> Option<&str>;

    /// Milliseconds on the host's monotonic clock (Linux: `CLOCK_MONOTONIC`), shared by every
    /// process of the boot that [`boot_id`](Self::boot_id) names. Read only when `boot_id` is
    /// `Some`.
    fn monotonic_ms(&self) -> i64;
}

/// The system's clocks: `SystemTime` for the wall clock and, on Linux, `CLOCK_MONOTONIC` under the
/// kernel's boot id for leases. Elsewhere (or where `/proc` is not readable) there is no boot id,
/// and leases follow the wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SqliteClock for SystemClock {
    fn wall_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    fn boot_id(&self) -> Option<&str> {
        static BOOT_ID: OnceLock<Option<String>> = OnceLock::new();
        BOOT_ID.get_or_init(read_boot_id).as_deref()
    }

    fn monotonic_ms(&self) -> i64 {
        monotonic_ms()
    }
}

#[cfg(target_os = "linux")]
fn read_boot_id() -> Option<String> {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) if !id.trim().is_empty() => Some(id.trim().to_owned()),
        other => {
            tracing::warn!(
                error = ?other.err(),
                "SQLite store: the host's boot id cannot be read; leases follow the wall clock, which a clock step moves"
            );
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn read_boot_id() -> Option<String> {
    None
}

#[cfg(target_os = "linux")]
fn monotonic_ms() -> i64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec.saturating_mul(1000).saturating_add(now.tv_nsec / 1_000_000)
}

#[cfg(not(target_os = "linux"))]
fn monotonic_ms() -> i64 {
    SystemClock.wall_ms()
}

/// What a lease deadline's `lease_boot` column holds when leases follow the wall clock.
pub(super) const WALL: &str = "wall";

/// The clock leases are measured on now: its name (a boot id, or [`WALL`]) and its reading.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseClock<'a> {
    pub(super) basis: &'a str,
    pub(super) now: i64,
}

impl<'a> LeaseClock<'a> {
    /// `clock`'s monotonic clock under its boot, or its wall clock where it has none.
    pub(super) fn read(clock: &'a dyn SqliteClock) -> Self {
        match clock.boot_id() {
            Some(boot) => Self { basis: boot, now: clock.monotonic_ms() },
            None => Self { basis: WALL, now: clock.wall_ms() },
        }
    }

    /// Whether leases are measured on a monotonic clock.
    pub(super) fn monotonic(&self) -> bool {
        self.basis != WALL
    }
}
