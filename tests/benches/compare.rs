//! `idempotent` beside bare handlers, hand-written ceilings and a peer crate, over loopback HTTP,
//! printed as figures (never asserted, except that every keyed variant really replays).
//!
//! `cargo bench -p idempotent-tests --bench compare` runs the whole comparison (about 3 s measured
//! per cell after 1 s of warm-up); `-- --quick` runs it in about a minute and a half (0.5 s per
//! cell); `-- --out DIR` writes `compare.json` and `compare.svg` in `DIR` (default
//! `target/compare` under the workspace root); `-- --only TEXT` runs only the rows whose variant
//! contains `TEXT`, or one of its comma-separated parts (`--only "bare axum,ours axum memory"`; a
//! ratio to a row not run shows `n/a`). It prints:
//! 1. a header: the command, the mode, the machine's available parallelism, the time per cell;
//! 2. one table with a row per variant, mode (`first`: a fresh key per request; `replay`: each
//!    client cycling over a few keys it completed before the measured window) and number of
//!    concurrent clients (1, 16, 64): requests per second, median and 99th percentile latency, a
//!    ratio and what it is to, and the answers that were not 2xx (every answer's status is
//!    checked: a non-zero count is also printed as a warning);
//! 3. the CPU time per request, over each cell's window, of the threads that serve (every thread
//!    of the process but the load generator's; store servers run apart and are not counted) and
//!    of the load generator's, with the serving threads' ratio to the same reference row: on a
//!    machine whose cores the load generator shares, requests per second depend on the share it
//!    takes, and this does not;
//! 4. ours on axum against the hand-written ceiling on the same store;
//! 5. the duplicate-execution bursts: 64 concurrent requests with one key, each on a fresh
//!    connection, released together, five times with five keys, against a handler that counts
//!    its executions and takes 50 ms: the executions, and the statuses answered.
//!
//! The rows (the same handler everywhere: `POST /charge` of `{"amount":100,"currency":"EUR"}`,
//! answered 201 with the charge echoed and an id):
//! - `bare axum`, `bare actix`: the handler alone; their ratio is 1.00.
//! - `ours F S`: `#[idempotent(scope = "compare.charge", fields = [amount, currency])]` on
//!   framework F with store S (memory; SQLite, a file in the temporary directory with the store's
//!   defaults; PostgreSQL, a test schema; MySQL (MariaDB), a test database; Redis, a key prefix of
//!   this run); the ratio is to bare F at the same mode and clients. `ours axum postgres unbatched`
//!   is `ours axum postgres` with group commit off (`PostgresConfig::group_commit(1)`; it is on by
//!   default), measured against the same hand-written ceiling.
//! - `hand axum S`: an axum handler doing by hand the round trips of our store S with the same
//!   guarantees (see `compare/hand.rs`), on a pool or connection configured like the store's;
//!   the ratio is to bare axum.
//! - `peer axum-idempotent`: axum-idempotent 0.6 (cookies, a ruts session in moka, its layer
//!   keyed by the `Idempotency-Key` header); each client connection logs in first (`GET /login`)
//!   because it caches only for a request that carries a session; the ratio is to ours on axum on
//!   memory. A replay of it at start-up must carry its replay header, as ours must.
//!
//! The load generator is hyper's HTTP/1 client, one keep-alive connection per client, each client
//! sending its requests one after another, on a tokio runtime of its own with two workers; axum
//! servers run on another two-worker runtime, actix-web servers with two workers in a system of
//! their own. A cell warms up, then counts the requests completed within its window. PostgreSQL,
//! MySQL and Redis rows are skipped, with a note, when no server can be had. Machines are shared and
//! noisy: compare ratios within one run, not absolute numbers across runs.

#[path = "compare/chart.rs"]
mod chart;
#[path = "compare/hand.rs"]
mod hand;
#[path = "compare/load.rs"]
mod load;
#[path = "compare/variants.rs"]
mod variants;

use load::{Measured, Mode, Target, Timing};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use variants::{Framework, Kind, Server, Services, StoreKind, Variant};

const CLIENTS: [usize; 3] = [1, 16, 64];
const BURSTS: usize = 5;
const BURST_SIZE: usize = 64;

struct Options {
    quick: bool,
    out: PathBuf,
    only: Option<String>,
    args: Vec<String>,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut options = Options {
        quick: false,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("compare"),
        only: None,
        args: Vec::new(),
    };
    while let Some(arg) = args.next() {
        options.args.push(arg.clone());
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--out" => match args.next() {
                Some(dir) => {
                    options.args.push(dir.clone());
                    options.out = PathBuf::from(dir);
                }
                None => eprintln!("compare: --out needs a directory; using {}", options.out.display()),
            },
            "--only" => match args.next() {
                Some(text) => {
                    options.args.push(text.clone());
                    options.only = Some(text);
                }
                None => eprintln!("compare: --only needs a text; running every variant"),
            },
            other => eprintln!("compare: ignoring unknown argument `{other}`"),
        }
    }
    options
}

/// One measured cell, as written to `compare.json`.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    variant: String,
    kind: Kind,
    framework: Framework,
    store: StoreKind,
    mode: &'static str,
    clients: usize,
    requests: u64,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    errors: u64,
    replayed: u64,
    /// Requests per second over those of the row named by `ratio_to` at the same mode and
    /// clients (1 for a bare row; none when that row did not run).
    ratio: Option<f64>,
    ratio_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_failure: Option<String>,
    /// CPU time per request of the serving threads in the window, in microseconds (see
    /// `load::Measured::server_cpu_us`).
    server_cpu_us: f64,
    /// The same of the load generator's threads.
    load_cpu_us: f64,
    /// Of `server_cpu_us`, the kernel's (see `load::Measured::server_sys_us`).
    server_sys_us: f64,
    /// Context switches of the serving threads per request.
    server_switches: f64,
    /// `server_cpu_us` over that of the row named in `ratio_to`.
    server_cpu_ratio: Option<f64>,
}

/// The bursts of one variant.
#[derive(Debug, Clone, Serialize)]
struct Bursts {
    variant: String,
    kind: Kind,
    framework: Framework,
    store: StoreKind,
    bursts: usize,
    requests_per_burst: usize,
    executions: u64,
    executions_per_burst: Vec<u64>,
    statuses: BTreeMap<String, u64>,
}

/// Ours on axum against the hand-written ceiling, one store, mode and concurrency.
#[derive(Debug, Clone, Serialize)]
struct Ceiling {
    store: StoreKind,
    mode: &'static str,
    clients: usize,
    ours_rps: f64,
    hand_rps: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    mode: &'static str,
    available_parallelism: usize,
    warmup_seconds: f64,
    seconds_per_cell: f64,
    clients: Vec<usize>,
    cells: Vec<Cell>,
    ceilings: Vec<Ceiling>,
    bursts: Vec<Bursts>,
    skipped: Vec<String>,
    run_seconds: f64,
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Sends one key twice: both answers must be 2xx, and on a keyed variant the second must be a
/// replay of the first (the replay header, the same body with the same id).
async fn check_replay(v: Variant, target: Target) -> Result<(), String> {
    let mut client = load::Client::open(target).await?;
    let first = client.post(load::CHARGE, "start-up-check").await?;
    let second = client.post(load::CHARGE, "start-up-check").await?;
    if !first.status.is_success() || !second.status.is_success() {
        return Err(format!("answered {} then {}", first.status, second.status));
    }
    if v.replays() && !(second.replayed && second.body == first.body) {
        return Err(format!(
            "the second request with one key was not a replay (replay header: {}, same body: {})",
            second.replayed,
            second.body == first.body
        ));
    }
    Ok(())
}

fn cell_row(v: Variant, mode: Mode, clients: usize, m: Measured) -> Cell {
    Cell {
        variant: v.label(),
        kind: v.kind,
        framework: v.framework,
        store: v.store,
        mode: mode.label(),
        clients,
        requests: m.requests,
        seconds: m.seconds,
        rps: m.rps,
        p50_ms: m.p50_ms,
        p99_ms: m.p99_ms,
        non_2xx: m.non_2xx,
        errors: m.errors,
        replayed: m.replayed,
        ratio: None,
        ratio_to: None,
        first_failure: m.first_failure,
        server_cpu_us: m.server_cpu_us,
        load_cpu_us: m.load_cpu_us,
        server_sys_us: m.server_sys_us,
        server_switches: m.server_switches,
        server_cpu_ratio: None,
    }
}

async fn run(
    timing: Timing,
    only: Option<&str>,
    axum_rt: tokio::runtime::Handle,
) -> (Vec<Cell>, Vec<Bursts>, Vec<String>) {
    let services = Services {
        redis_url: idempotent_tests::redis_server::redis_url().await,
        postgres: idempotent_tests::postgres::database_url().await.is_some(),
        mysql: idempotent_tests::mysql::server_url().await.is_some(),
        run_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
    };
    let (mut cells, mut bursts, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for v in Variant::all() {
        if only.is_some_and(|text| !text.split(',').any(|part| v.label().contains(part.trim()))) {
            continue;
        }
        if !services.has(v.store) {
            skipped.push(format!("{}: no {} server", v.label(), v.store.label()));
            continue;
        }
        let server = match Server::start(v, &services, &axum_rt).await {
            Ok(s) => s,
            Err(e) => {
                skipped.push(format!("{}: did not start: {e}", v.label()));
                continue;
            }
        };
        let target = Target { addr: server.addr, session: v.session() };
        if let Err(e) = check_replay(v, target).await {
            server.stop().await;
            panic!("{}: start-up check failed: {e}", v.label());
        }
        for mode in Mode::ALL {
            for clients in CLIENTS {
                let m = load::cell(target, mode, clients, timing, &format!("f{clients}")).await;
                eprintln!(
                    "  {:<28} {:<6} {clients:>3} clients: {:>8.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
                    v.label(),
                    mode.label(),
                    m.rps,
                    m.p50_ms,
                    m.p99_ms
                );
                cells.push(cell_row(v, mode, clients, m));
            }
        }
        if v.bursts() {
            let mut row = Bursts {
                variant: v.label(),
                kind: v.kind,
                framework: v.framework,
                store: v.store,
                bursts: BURSTS,
                requests_per_burst: BURST_SIZE,
                executions: 0,
                executions_per_burst: Vec::new(),
                statuses: BTreeMap::new(),
            };
            for b in 0..BURSTS {
                let before = server.runs.load(Ordering::SeqCst);
                let statuses = load::burst(target, &format!("burst-{b}"), BURST_SIZE).await;
                let executions = server.runs.load(Ordering::SeqCst) - before;
                row.executions += executions;
                row.executions_per_burst.push(executions);
                for (status, n) in statuses {
                    let name = if status == 0 { "no answer".to_owned() } else { status.to_string() };
                    *row.statuses.entry(name).or_insert(0) += n;
                }
            }
            bursts.push(row);
        }
        server.stop().await;
    }
    (cells, bursts, skipped)
}

/// What a row's ratio is taken against: `None` for a row that is its own reference.
fn reference(v: Variant) -> Option<Variant> {
    match v.kind {
        Kind::Bare => None,
        Kind::Ours => Some(Variant::new(Kind::Bare, v.framework, StoreKind::None)),
        Kind::Hand => Some(Variant::new(Kind::Bare, Framework::Axum, StoreKind::None)),
        Kind::Peer => Some(Variant::new(Kind::Ours, Framework::Axum, StoreKind::Memory)),
    }
}

fn find<'a>(cells: &'a [Cell], v: Variant, mode: &str, clients: usize) -> Option<&'a Cell> {
    cells.iter().find(|c| c.variant == v.label() && c.mode == mode && c.clients == clients)
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// Fills in each cell's ratio to its reference row.
fn add_ratios(cells: &mut [Cell]) {
    let ratios: Vec<(Option<f64>, Option<String>, Option<f64>)> = cells
        .iter()
        .map(|c| match reference(Variant::new(c.kind, c.framework, c.store)) {
            None => (Some(1.0), None, Some(1.0)),
            Some(base) => {
                let b = find(cells, base, c.mode, c.clients);
                (
                    b.and_then(|b| ratio(c.rps, b.rps)),
                    Some(base.label()),
                    b.and_then(|b| ratio(c.server_cpu_us, b.server_cpu_us)),
                )
            }
        })
        .collect();
    for (c, (r, to, cpu)) in cells.iter_mut().zip(ratios) {
        c.ratio = r;
        c.ratio_to = to;
        c.server_cpu_ratio = cpu;
    }
}

fn ceilings(cells: &[Cell]) -> Vec<Ceiling> {
    let mut rows = Vec::new();
    let stores = [
        StoreKind::Memory,
        StoreKind::Sqlite,
        StoreKind::Postgres,
        StoreKind::PostgresUnbatched,
        StoreKind::MySql,
        StoreKind::Redis,
    ];
    for store in stores {
        let ours = Variant::new(Kind::Ours, Framework::Axum, store);
        // Batched or not, PostgreSQL's ceiling is the one hand-written handler.
        let hand_store = if store == StoreKind::PostgresUnbatched { StoreKind::Postgres } else { store };
        let hand = Variant::new(Kind::Hand, Framework::Axum, hand_store);
        for mode in Mode::ALL {
            for clients in CLIENTS {
                let (Some(o), Some(h)) =
                    (find(cells, ours, mode.label(), clients), find(cells, hand, mode.label(), clients))
                else {
                    continue;
                };
                rows.push(Ceiling {
                    store,
                    mode: mode.label(),
                    clients,
                    ours_rps: o.rps,
                    hand_rps: h.rps,
                    ratio: ratio(o.rps, h.rps).unwrap_or(0.0),
                });
            }
        }
    }
    rows
}

/// Prints `row` of each cell, a blank line between variants.
fn print_cells(cells: &[Cell], row: impl Fn(&Cell) -> String) {
    for (i, c) in cells.iter().enumerate() {
        if i > 0 && cells[i - 1].variant != c.variant {
            println!();
        }
        println!("{}", row(c));
    }
}

fn print_report(report: &Report, timing: Timing) {
    println!(
        "compare: idempotent beside bare handlers, hand-written ceilings and axum-idempotent, over loopback HTTP/1"
    );
    println!("command: {}", report.command);
    println!(
        "mode: {} ({:.2} s warm-up, {:.2} s measured per cell; {} replay keys per client); clients {}; available parallelism: {}",
        report.mode,
        report.warmup_seconds,
        report.seconds_per_cell,
        timing.replay_keys,
        CLIENTS.map(|c| c.to_string()).join(", "),
        report.available_parallelism
    );
    println!(
        "load: hyper HTTP/1, one keep-alive connection per client, on its own 2-worker runtime; servers: axum on a 2-worker runtime, actix-web with 2 workers"
    );
    for note in &report.skipped {
        println!("skipped: {note}");
    }

    println!();
    println!(
        "{:<28} {:<6} {:>7} {:>9} {:>8} {:>8} {:>7}  {:<18} {:>7}",
        "variant", "mode", "clients", "req/s", "p50 ms", "p99 ms", "ratio", "ratio to", "non-2xx"
    );
    print_cells(&report.cells, |c| {
        format!(
            "{:<28} {:<6} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>7}  {:<18} {:>7}",
            c.variant,
            c.mode,
            c.clients,
            c.rps,
            c.p50_ms,
            c.p99_ms,
            c.ratio.map_or("n/a".to_owned(), |r| format!("{r:.2}")),
            c.ratio_to.as_deref().unwrap_or("-"),
            c.non_2xx + c.errors
        )
    });

    println!();
    println!(
        "CPU time per request in this process over the measured window (µs): the serving threads' (store servers not counted), of it in the kernel, their context switches per request, and the load generator's"
    );
    println!(
        "{:<28} {:<6} {:>7} {:>10} {:>7}  {:<18} {:>7} {:>9} {:>9}",
        "variant", "mode", "clients", "server µs", "ratio", "ratio to", "sys µs", "switches", "load µs"
    );
    print_cells(&report.cells, |c| {
        format!(
            "{:<28} {:<6} {:>7} {:>10.1} {:>7}  {:<18} {:>7.1} {:>9.2} {:>9.1}",
            c.variant,
            c.mode,
            c.clients,
            c.server_cpu_us,
            c.server_cpu_ratio.map_or("n/a".to_owned(), |r| format!("{r:.2}")),
            c.ratio_to.as_deref().unwrap_or("-"),
            c.server_sys_us,
            c.server_switches,
            c.load_cpu_us
        )
    });

    println!();
    println!("ours on axum against the hand-written ceiling on the same store (req/s)");
    println!("{:<16} {:<6} {:>7} {:>10} {:>10} {:>10}", "store", "mode", "clients", "ours", "hand", "ours/hand");
    if report.ceilings.is_empty() {
        println!("(no store has both rows in this run)");
    }
    for c in &report.ceilings {
        println!(
            "{:<16} {:<6} {:>7} {:>10.0} {:>10.0} {:>10.2}",
            c.store.label(),
            c.mode,
            c.clients,
            c.ours_rps,
            c.hand_rps,
            c.ratio
        );
    }

    println!();
    println!(
        "duplicate executions: {BURSTS} bursts of {BURST_SIZE} concurrent requests with one key (a fresh connection each), handler of {} ms",
        variants::BURST_WORK.as_millis()
    );
    println!("{:<28} {:>8} {:>11} {:<16} statuses", "variant", "requests", "executions", "per burst");
    for b in &report.bursts {
        let per = b.executions_per_burst.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let statuses = b.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ");
        println!(
            "{:<28} {:>8} {:>11} {:<16} {statuses}",
            b.variant,
            b.bursts * b.requests_per_burst,
            b.executions,
            per
        );
    }

    let mut warnings = Vec::new();
    for c in &report.cells {
        if c.non_2xx + c.errors > 0 {
            warnings.push(format!(
                "{} {} {} clients: {} non-2xx answers, {} requests without an answer (first: {})",
                c.variant,
                c.mode,
                c.clients,
                c.non_2xx,
                c.errors,
                c.first_failure.as_deref().unwrap_or("-")
            ));
        }
        if c.mode == "replay" && c.kind != Kind::Bare && c.replayed < c.requests {
            warnings.push(format!(
                "{} replay {} clients: {} of {} answers carried the replay header",
                c.variant, c.clients, c.replayed, c.requests
            ));
        }
    }
    for b in &report.bursts {
        if b.kind == Kind::Ours && b.executions_per_burst.iter().any(|&e| e != 1) {
            warnings
                .push(format!("{}: executions per burst {:?}, expected one each", b.variant, b.executions_per_burst));
        }
    }
    if !warnings.is_empty() {
        println!();
        for w in warnings {
            println!("WARNING: {w}");
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "compare: run with `cargo bench -p idempotent-tests --bench compare` (add `-- --quick` for a short run)"
        );
        return;
    }
    let options = options();
    let timing = match options.quick {
        true => Timing { warmup: Duration::from_millis(200), measure: Duration::from_millis(500), replay_keys: 4 },
        false => Timing { warmup: Duration::from_secs(1), measure: Duration::from_secs(3), replay_keys: 4 },
    };
    let started = Instant::now();
    let servers = runtime("compare-axum");
    let clients = runtime("compare-load");
    let (mut cells, bursts, skipped) = clients.block_on(run(timing, options.only.as_deref(), servers.handle().clone()));
    drop(servers);
    add_ratios(&mut cells);
    let mut command = "cargo bench -p idempotent-tests --bench compare".to_owned();
    if !options.args.is_empty() {
        command = format!("{command} -- {}", options.args.join(" "));
    }
    let report = Report {
        command,
        mode: if options.quick { "quick" } else { "full" },
        available_parallelism: std::thread::available_parallelism().map_or(0, |n| n.get()),
        warmup_seconds: timing.warmup.as_secs_f64(),
        seconds_per_cell: timing.measure.as_secs_f64(),
        clients: CLIENTS.to_vec(),
        ceilings: ceilings(&cells),
        cells,
        bursts,
        skipped,
        run_seconds: started.elapsed().as_secs_f64(),
    };
    print_report(&report, timing);

    if let Err(e) = std::fs::create_dir_all(&options.out) {
        println!("\ncould not create {}: {e}", options.out.display());
        return;
    }
    let out = options.out.canonicalize().unwrap_or(options.out.clone());
    let json = out.join("compare.json");
    match serde_json::to_string_pretty(&report).map(|s| std::fs::write(&json, s)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => println!("\ncould not write {}: {e}", json.display()),
        Err(e) => println!("\ncould not encode the report: {e}"),
    }
    let svg = out.join("compare.svg");
    let lines: Vec<chart::Line> = Variant::all()
        .into_iter()
        .filter(|v| report.cells.iter().any(|c| c.variant == v.label()))
        .map(|v| {
            let points = |mode: Mode| {
                CLIENTS
                    .iter()
                    .filter_map(|&n| find(&report.cells, v, mode.label(), n).map(|c| (n, c.rps)))
                    .collect::<Vec<_>>()
            };
            chart::Line { variant: v, label: v.label(), first: points(Mode::First), replay: points(Mode::Replay) }
        })
        .collect();
    let subtitle = format!(
        "{} mode, {:.2} s per cell after {:.2} s warm-up, {} cores available; same handler everywhere, loopback HTTP/1",
        report.mode, report.seconds_per_cell, report.warmup_seconds, report.available_parallelism
    );
    if let Err(e) = chart::write(&svg, &subtitle, &lines) {
        println!("\ncould not draw {}: {e}", svg.display());
    }
    println!();
    println!("written: {} and {}", json.display(), svg.display());
    println!("run took {:.1} s", report.run_seconds);
}
