//! Test hosts: servers on a network of their own, which a test cuts off from its clients the way
//! a real network does, by dropping packets: nothing is refused, nothing is reset, the peer just
//! goes silent.
//!
//! A [`TestHost`] is a network namespace joined to the test's own (the root namespace) by a veth
//! pair on a private /30 of `10.213.0.0/16`: the root end is [`TestHost::peer`], the namespace's
//! end [`TestHost::addr`], where the servers started in it ([`TestHost::redis`],
//! [`TestHost::postgres`]) listen. Each host takes the first free /30 from one derived from the
//! process id; `ip netns add` refuses a name that exists, so two test processes never share one.
//!
//! The faults are nftables rules in the host's own namespace (a table of its own, `idem_fault`),
//! so nothing of the machine's own firewall is touched:
//! - [`TestHost::partition`]: every packet in and out of the host's link is dropped;
//! - [`TestHost::lossy`]: a share of the packets is dropped each way (`numgen random`), a share
//!   duplicated each way (`dup`), and the link is slow both ways (a `tbf` qdisc on each end), so
//!   packets wait in line behind each other: the delay grows with the traffic;
//! - [`TestHost::heal`]: the rules and the qdiscs removed.
//!
//! TCP connections across the link survive a partition (the kernel retransmits with its own
//! back-off), so after healing, an open connection recovers at its next retransmission, not at
//! once, as on a real network.
//!
//! What it needs: root, iproute2 (`ip netns`), nftables (`nft`), `tc` and, for the servers,
//! `redis-server`, PostgreSQL's `initdb` and `postgres` (run as the `postgres` user through
//! `setpriv`) — [`unavailable`] says what is missing. Dropping a host kills every process in its
//! namespace (`ip netns pids`), deletes the namespace and the root end of the link, and removes
//! its directory; a watchdog does the same once the test binary has exited, should it be killed.

use crate::postgres::find_bin;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The /16 the hosts' links are carved from, one /30 each.
const NETWORK: [u8; 2] = [10, 213];
/// The /30s in [`NETWORK`].
const SLOTS: u32 = 1 << 14;
/// The name of the nftables table the faults are written in, in the host's namespace.
const TABLE: &str = "idem_fault";

/// Why test hosts cannot be made here (not root, a tool missing), or `None` when they can.
pub fn unavailable() -> Option<String> {
    if !crate::postgres::is_root() {
        return Some("network namespaces need root".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")] {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not installed (Debian package {package})"));
        }
    }
    if let Err(e) = run(&["ip", "netns", "list"]) {
        return Some(format!("`ip netns` does not work here: {e}"));
    }
    None
}

fn on_path(tool: &str) -> bool {
    let dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    dirs.iter().chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")].iter()).any(|d| d.join(tool).is_file())
}

/// Runs `args`; its stderr as the error when it fails.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// How a [lossy](TestHost::lossy) link treats packets, each way.
#[derive(Debug, Clone, Copy)]
pub struct Lossy {
    /// Share of the packets dropped, in percent.
    pub loss_percent: u8,
    /// Share of the packets that pass which are sent twice, in percent.
    pub duplicate_percent: u8,
    /// The link's rate in kbit/s, with a one-packet bucket: packets beyond it wait in line.
    pub rate_kbit: u32,
}

/// A network namespace with its link to the root namespace, and the servers started in it.
#[derive(Debug)]
pub struct TestHost {
    /// The namespace's name.
    pub name: String,
    /// The namespace's end of the link, where its servers listen.
    pub addr: Ipv4Addr,
    /// The root namespace's end of the link.
    pub peer: Ipv4Addr,
    /// The link's device in the root namespace.
    outer: String,
    /// The link's device in the namespace.
    inner: String,
    dir: PathBuf,
    servers: Mutex<Vec<Child>>,
    watchdog: Option<Child>,
}

impl TestHost {
    /// Makes a namespace on a free /30 and brings its link up; the reason when it cannot.
    pub fn create() -> Result<Self, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        let start = std::process::id().wrapping_mul(2_654_435_761) % SLOTS;
        for n in 0..256 {
            let slot = (start + n) % SLOTS;
            let name = format!("idem-{slot}");
            if let Err(e) = run(&["ip", "netns", "add", &name]) {
                if e.contains("exists") {
                    continue;
                }
                return Err(e);
            }
            let base = slot * 4;
            let octets =
                |last: u32| Ipv4Addr::new(NETWORK[0], NETWORK[1], (base >> 8) as u8, ((base & 0xff) + last) as u8);
            let dir = std::env::temp_dir().join(format!("idempotent-host-{name}"));
            let host = Self {
                outer: format!("idem{slot}o"),
                inner: format!("idem{slot}i"),
                peer: octets(1),
                addr: octets(2),
                watchdog: crate::process::after_exit(&format!(
                    "for p in $(ip netns pids {name}); do kill -9 $p; done; ip netns del {name}; ip link del idem{slot}o; rm -rf '{}'",
                    dir.display()
                )),
                dir,
                name,
                servers: Mutex::new(Vec::new()),
            };
            match host.link() {
                Ok(()) => return Ok(host),
                // A link of that name left behind by a process that was killed: the next slot.
                Err(e) if e.contains("exists") => continue,
                Err(e) => return Err(e),
            }
        }
        Err("no free /30 in 10.213.0.0/16 after 256 tries".into())
    }

    fn link(&self) -> Result<(), String> {
        let (peer, addr) = (format!("{}/30", self.peer), format!("{}/30", self.addr));
        run(&["ip", "link", "add", &self.outer, "type", "veth", "peer", "name", &self.inner, "netns", &self.name])?;
        run(&["ip", "addr", "add", &peer, "dev", &self.outer])?;
        run(&["ip", "link", "set", &self.outer, "up"])?;
        run(&["ip", "-n", &self.name, "addr", "add", &addr, "dev", &self.inner])?;
        run(&["ip", "-n", &self.name, "link", "set", &self.inner, "up"])?;
        run(&["ip", "-n", &self.name, "link", "set", "lo", "up"])?;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))
    }

    /// A command run in the namespace.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Starts `cmd` in the background with its output in `log` (in the host's directory).
    fn spawn(&self, mut cmd: Command, log: &str) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.join(log)).map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        self.servers.lock().unwrap_or_else(|e| e.into_inner()).push(child);
        Ok(())
    }

    /// Starts `redis-server` in the namespace on `port` (no persistence) and waits until it
    /// answers; its URL.
    pub async fn redis(&self, port: u16) -> Result<String, String> {
        let mut cmd = self.command(Path::new("redis-server"));
        cmd.args(["--bind", &self.addr.to_string(), "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir"])
            .arg(&self.dir);
        self.spawn(cmd, "redis.log")?;
        let url = format!("redis://{}:{port}", self.addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::redis_server::ping(&url).await {
            if Instant::now() > deadline {
                return Err(format!("redis-server in {} did not answer: {}", self.name, self.log("redis.log")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(url)
    }

    /// Starts PostgreSQL in the namespace on `port`, on a copy of `cluster`, as the `postgres`
    /// user, and waits until it accepts a connection; the URL of its `postgres` database.
    pub async fn postgres(&self, cluster: &PgCluster, port: u16) -> Result<String, String> {
        let data = self.dir.join("pgdata");
        run(&["cp", "-a", &cluster.data.to_string_lossy(), &data.to_string_lossy()])?;
        run(&["chown", "postgres:", &self.dir.to_string_lossy()])?;
        let mut cmd = self.command(Path::new("setpriv"));
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
            .arg(&cluster.postgres)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&data)
            .arg("-c")
            .arg(format!("listen_addresses={}", self.addr))
            .args(["-c", "fsync=off"]);
        self.spawn(cmd, "postgres.log")?;
        let url = format!("postgres://postgres@{}:{port}/postgres", self.addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_secs(2), <sqlx::PgConnection as sqlx::Connection>::connect(&url))
                    .await;
            if let Ok(Ok(c)) = attempt {
                let _ = sqlx::Connection::close(c).await;
                return Ok(url);
            }
            if Instant::now() > deadline {
                return Err(format!("PostgreSQL in {} did not answer: {}", self.name, self.log("postgres.log")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Runs an nftables script in the namespace, replacing the fault table with `chains`.
    fn faults(&self, chains: &str) -> Result<(), String> {
        // Declaring the table first makes the delete valid whether or not it exists.
        let script = format!(
            "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\ncounter dropped {{}}\ncounter duplicated {{}}\n{chains}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        child.stdin.take().expect("piped stdin").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("nft in {}: {}\n{script}", self.name, String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Drops every packet in and out of the host's link, both ways, until [`heal`](Self::heal).
    pub fn partition(&self) -> Result<(), String> {
        let inner = &self.inner;
        self.faults(&format!(
            "chain input {{ type filter hook prerouting priority raw; policy accept; iifname \"{inner}\" counter name dropped drop; }}
             chain output {{ type filter hook output priority raw; policy accept; oifname \"{inner}\" counter name dropped drop; }}"
        ))
    }

    /// Makes the link lossy, both ways, until [`heal`](Self::heal) (see [`Lossy`]).
    pub fn lossy(&self, link: Lossy) -> Result<(), String> {
        let (inner, addr, peer) = (&self.inner, self.addr, self.peer);
        let Lossy { loss_percent: loss, duplicate_percent: dup, rate_kbit } = link;
        // Incoming duplicates are sent to the namespace's own address through its loopback, so
        // they arrive a second time; outgoing ones go to the peer over the link.
        self.faults(&format!(
            "chain input {{ type filter hook prerouting priority raw; policy accept;
                 iifname \"{inner}\" numgen random mod 100 < {loss} counter name dropped drop;
                 iifname \"{inner}\" numgen random mod 100 < {dup} counter name duplicated dup to {addr} device \"lo\"; }}
             chain output {{ type filter hook output priority raw; policy accept;
                 oifname \"{inner}\" numgen random mod 100 < {loss} counter name dropped drop;
                 oifname \"{inner}\" numgen random mod 100 < {dup} counter name duplicated dup to {peer} device \"{inner}\"; }}"
        ))?;
        let tbf = ["root", "tbf", "rate", &format!("{rate_kbit}kbit"), "burst", "1600", "limit", "262144"];
        run(&[&["tc", "qdisc", "replace", "dev", &self.outer][..], &tbf].concat())?;
        run(&[&["ip", "netns", "exec", &self.name, "tc", "qdisc", "replace", "dev", inner][..], &tbf].concat())
    }

    /// Packets dropped and packets duplicated since the current fault was set, both ways: proof
    /// that the fault was in the way of the traffic.
    pub fn counted(&self) -> Result<(u64, u64), String> {
        let packets = |counter: &str| -> Result<u64, String> {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.name, "nft", "list", "counter", "ip", TABLE, counter])
                .output()
                .map_err(|e| format!("nft: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut words = text.split_whitespace();
            words.find(|w| *w == "packets");
            words.next().and_then(|n| n.parse().ok()).ok_or_else(|| {
                format!("no `packets` in the counter {counter}: {text}{}", String::from_utf8_lossy(&out.stderr))
            })
        };
        Ok((packets("dropped")?, packets("duplicated")?))
    }

    /// Removes every fault: the link passes everything again.
    pub fn heal(&self) -> Result<(), String> {
        let _ = run(&["tc", "qdisc", "del", "dev", &self.outer, "root"]);
        let _ = run(&["ip", "netns", "exec", &self.name, "tc", "qdisc", "del", "dev", &self.inner, "root"]);
        self.faults("")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for child in self.servers.get_mut().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // What the servers started (PostgreSQL's backends) and anything else still in there.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
        // Deleting the namespace takes its end of the link with it, in the background: the
        // root end goes now.
        let _ = run(&["ip", "link", "del", &self.outer]);
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// A PostgreSQL cluster made once with `initdb` (trust authentication, from any address), that
/// each [`TestHost::postgres`] starts a copy of.
#[derive(Debug)]
pub struct PgCluster {
    data: PathBuf,
    postgres: PathBuf,
    watchdog: Option<Child>,
}

impl PgCluster {
    /// Runs `initdb` as the `postgres` user; the reason when it cannot.
    pub fn init() -> Result<Self, String> {
        let initdb = find_bin("initdb").ok_or("no initdb (PATH or /usr/lib/postgresql/*/bin)")?;
        let postgres = find_bin("postgres").ok_or("no postgres (PATH or /usr/lib/postgresql/*/bin)")?;
        let dir = std::env::temp_dir().join(format!("idempotent-pg-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        run(&["chown", "postgres:", &dir.to_string_lossy()])?;
        let data = dir.join("data");
        let out = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
            .arg(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb: {}", String::from_utf8_lossy(&out.stderr)));
        }
        // The test's own network only: the hosts' links.
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).map_err(|e| e.to_string())?;
        std::fs::write(&hba, format!("{rules}\nhost all all {}.{}.0.0/16 trust\n", NETWORK[0], NETWORK[1]))
            .map_err(|e| e.to_string())?;
        let watchdog = crate::process::after_exit(&format!("rm -rf '{}'", dir.display()));
        Ok(Self { data, postgres, watchdog })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(parent) = self.data.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
