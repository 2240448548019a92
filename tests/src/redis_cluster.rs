//! A Redis Cluster of a test's own, to change its topology: masters with replicas, each node a
//! `redis-server --cluster-enabled yes` child process ([`RedisProcess`]) on a free loopback port,
//! in its own temporary directory, joined by `redis-cli --cluster create`.
//!
//! [`RedisCluster::start`] returns `None` after a loud `SKIPPED` line when the cluster cannot be
//! started (no `redis-server` or `redis-cli` on `PATH`, no free ports), and panics under `CI=true`
//! instead, like the rest of [`crate::redis_server`]. Dropping the cluster kills every node it
//! started; a watchdog per node kills it anyway when the test binary exits.

use crate::redis_server::{free_port, skip, RedisProcess};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running Redis Cluster of the calling test's own.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisProcess>,
}

/// A node's role, from `ROLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A master.
    Master,
    /// A replica of the master on this loopback port, with whether its link to it is up.
    Replica {
        /// The master's port.
        master: u16,
        /// Whether the replication link is up (`connected`).
        connected: bool,
    },
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each (`masters` must be at least 3),
    /// every node with `extra` `redis-server` arguments (e.g. `--cluster-node-timeout 1000`), and
    /// waits until every node reports `cluster_state:ok` and sees every replica attached.
    /// `None`, after a loud `SKIPPED` line (a panic under `CI=true`), when that is not possible
    /// here.
    pub async fn start(masters: usize, replicas: usize, extra: &[&str]) -> Option<Self> {
        let cluster = Self::try_start(masters, replicas, extra).await;
        if cluster.is_none() {
            skip(
                "cluster of the test's own",
                "put redis-server and redis-cli (Redis 7) on PATH; the cluster's nodes run on free loopback ports",
            );
        }
        cluster
    }

    /// [`start`](Self::start) without the skip: `None` when the cluster cannot be started.
    pub(crate) async fn try_start(masters: usize, replicas: usize, extra: &[&str]) -> Option<Self> {
        let started = Instant::now();
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_port(true)?;
            let conf = format!("nodes-{port}.conf");
            // A replica's first sync starts at once, not after the default 5 s wait for others.
            let mut args =
                vec!["--cluster-enabled", "yes", "--cluster-config-file", &conf, "--repl-diskless-sync-delay", "0"];
            args.extend_from_slice(extra);
            nodes.push(RedisProcess::start(port, &args).await?);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.arg("--cluster-replicas").arg(replicas.to_string()).arg("--cluster-yes").stdin(Stdio::null());
        let out = create.output().ok()?;
        if !out.status.success() {
            eprintln!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let cluster = Self { nodes };
        if !cluster.wait_until_settled(masters, masters * replicas, Duration::from_secs(20)).await {
            eprintln!("redis cluster did not settle: {:?}", cluster.roles().await);
            return None;
        }
        eprintln!(
            "redis cluster of {} nodes on ports {:?} ready in {:?}",
            cluster.nodes.len(),
            cluster.ports(),
            started.elapsed()
        );
        Some(cluster)
    }

    /// The ports of the nodes still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:PORT` of every node still running, as seed URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisProcess::url).collect()
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...` of every node still running.
    pub fn spec(&self) -> String {
        let hosts: Vec<String> = self.ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Each running node's port and role (`None` for a node that did not answer).
    pub async fn roles(&self) -> Vec<(u16, Option<Role>)> {
        let mut out = Vec::new();
        for port in self.ports() {
            out.push((port, role(port).await));
        }
        out
    }

    /// The ports of the running masters.
    pub async fn masters(&self) -> Vec<u16> {
        self.roles().await.into_iter().filter(|(_, r)| r == &Some(Role::Master)).map(|(p, _)| p).collect()
    }

    /// A running replica of the master on `master`.
    pub async fn replica_of(&self, master: u16) -> Option<u16> {
        self.roles().await.into_iter().find_map(|(p, r)| match r {
            Some(Role::Replica { master: m, .. }) if m == master => Some(p),
            _ => None,
        })
    }

    /// Whether every running node reports `cluster_state:ok`, there are `masters` masters and
    /// `replicas` replicas with their replication link up.
    pub async fn settled(&self, masters: usize, replicas: usize) -> bool {
        for port in self.ports() {
            if !cluster_state_ok(port).await {
                return false;
            }
        }
        let roles = self.roles().await;
        let m = roles.iter().filter(|(_, r)| r == &Some(Role::Master)).count();
        let r = roles.iter().filter(|(_, r)| matches!(r, Some(Role::Replica { connected: true, .. }))).count();
        m == masters && r == replicas
    }

    /// Waits up to `limit` for [`settled`](Self::settled).
    pub async fn wait_until_settled(&self, masters: usize, replicas: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.settled(masters, replicas).await {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Waits until the replica on `replica` has every write its master acknowledged (equal
    /// replication offsets), so a failover loses nothing written so far.
    pub async fn wait_replicated(&self, replica: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(Role::Replica { master, .. }) = role(replica).await {
                let offset = |port| async move {
                    let info = info(port, "replication").await.unwrap_or_default();
                    let field =
                        |name: &str| info.lines().find_map(|l| l.trim().strip_prefix(name)?.parse::<i64>().ok());
                    field(if port == replica { "slave_repl_offset:" } else { "master_repl_offset:" })
                };
                let (m, r) = (offset(master).await, offset(replica).await);
                if m.is_some() && m == r {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "replica {replica} did not catch up with its master");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Promotes the replica on `replica` with `CLUSTER FAILOVER` (the coordinated, lossless
    /// failover: its master stops taking writes until the replica has them all) and waits up to
    /// 10 s until it is a master.
    pub async fn failover(&self, replica: u16) {
        let mut c = connect(replica).await.expect("connect to the replica");
        let _: () = redis::cmd("CLUSTER").arg("FAILOVER").query_async(&mut c).await.expect("CLUSTER FAILOVER");
        let deadline = Instant::now() + Duration::from_secs(10);
        while role(replica).await != Some(Role::Master) {
            assert!(Instant::now() < deadline, "replica {replica} was not promoted: {:?}", self.roles().await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the node on `port` (SIGKILL) and forgets it.
    pub fn kill(&mut self, port: u16) {
        let i = self.nodes.iter().position(|n| n.port == port).expect("a node of this cluster");
        let mut node = self.nodes.remove(i);
        node.kill();
    }

    /// The port of the master that serves `key`, by `CLUSTER KEYSLOT` and `CLUSTER SLOTS` asked
    /// of the master on `via`.
    pub async fn owner(&self, via: u16, key: &str) -> u16 {
        let mut c = connect(via).await.expect("connect to the node");
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut c).await.expect("KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await.expect("SLOTS");
        for range in ranges {
            let redis::Value::Array(range) = range else { continue };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end)), Some(redis::Value::Array(master))) =
                (range.first(), range.get(1), range.get(2))
            else {
                continue;
            };
            if (*start..=*end).contains(&slot) {
                if let Some(redis::Value::Int(port)) = master.get(1) {
                    return u16::try_from(*port).expect("a port");
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The node on `port`, to [pause](RedisProcess::pause) it for instance.
    pub fn node(&self, port: u16) -> &RedisProcess {
        self.nodes.iter().find(|n| n.port == port).expect("a node of this cluster")
    }

    /// Sends `SCRIPT FLUSH` to the node on `port`: its script cache is then what a node restarted
    /// or added since the scripts were loaded has, none.
    pub async fn flush_scripts(&self, port: u16) {
        let mut c = connect(port).await.expect("connect to the node");
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.expect("SCRIPT FLUSH");
    }
}

async fn connect(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let connect = client.get_multiplexed_async_connection();
    tokio::time::timeout(Duration::from_secs(1), connect).await.ok()?.ok()
}

async fn info(port: u16, section: &str) -> Option<String> {
    let mut c = connect(port).await?;
    let mut ask = redis::cmd("INFO");
    ask.arg(section);
    tokio::time::timeout(Duration::from_secs(1), ask.query_async::<String>(&mut c)).await.ok()?.ok()
}

async fn cluster_state_ok(port: u16) -> bool {
    let Some(mut c) = connect(port).await else { return false };
    let mut ask = redis::cmd("CLUSTER");
    ask.arg("INFO");
    let answer = tokio::time::timeout(Duration::from_secs(1), ask.query_async::<String>(&mut c)).await;
    let info = answer.ok().and_then(Result::ok).unwrap_or_default();
    info.lines().any(|l| l.trim() == "cluster_state:ok")
}

impl RedisCluster {
    /// Keeps the node on `port` busy running a script that never ends, so that it answers every
    /// other command with `BUSY` (after 20 ms), until [`end_busy_script`](Self::end_busy_script).
    pub async fn start_busy_script(&self, port: u16) {
        let mut c = connect(port).await.expect("connect to the node");
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("busy-reply-threshold")
            .arg(20)
            .query_async(&mut c)
            .await
            .expect("CONFIG SET busy-reply-threshold");
        tokio::spawn(async move {
            // Answered with an error once `end_busy_script` kills it.
            let _ = redis::cmd("EVAL").arg("while true do end").arg(0).query_async::<()>(&mut c).await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Ends the script of [`start_busy_script`](Self::start_busy_script) (`SCRIPT KILL`).
    pub async fn end_busy_script(&self, port: u16) {
        let mut c = connect(port).await.expect("connect to the node");
        let _: () = redis::cmd("SCRIPT").arg("KILL").query_async(&mut c).await.expect("SCRIPT KILL");
    }
}

/// The role of the node on `port`, from `INFO replication`.
async fn role(port: u16) -> Option<Role> {
    let info = info(port, "replication").await?;
    let field = |name: &str| info.lines().find_map(|l| l.trim().strip_prefix(name).map(str::to_owned));
    match field("role:")?.as_str() {
        "master" => Some(Role::Master),
        "slave" => Some(Role::Replica {
            master: field("master_port:")?.parse().ok()?,
            connected: field("master_link_status:").as_deref() == Some("up"),
        }),
        _ => None,
    }
}
