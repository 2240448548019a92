//! Policy reports rendered from the registry: Markdown, JSON and a self-contained HTML page.
//!
//! Every format lists protected routes (sorted by scope) and exempt routes (sorted by path)
//! apart, each with its source location.
//!
//! # JSON schema, version 1
//! ```text
//! {
//!   "version": 1,
//!   "summary": { "protected": <int>, "exempt": <int> },
//!   "routes": [                      // protected routes, sorted by scope
//!     { "scope": <string>, "method": <string|null>, "path": <string|null>,
//!       "fields": [<string>],        // declared body fields; empty: see identity.body
//!       "identity": { "path": <part>, "query": <part>, "body": <part> },
//!                                    // <part>: "all" | [<string>] (only these) | "excluded"
//!       "served_at": [<string>],     // "METHOD /full/path" as requests reached it, under any
//!                                    // nested router or scope (empty before the first request)
//!       "ttl_seconds": <number>, "lease_seconds": <number>,
//!       "key": "required"|"optional", "on_conflict": "reject"|"wait",
//!       "wait_timeout_seconds": <number>, "stored_outcomes": "final"|"success"|"all",
//!       "fail_open": <bool>, "transactional": <bool>,
//!       "framework": "axum"|"actix"|"nats"|"rabbitmq", "transport": "http"|"nats"|"amqp",
//!       "consumes": [                // a consumer handler's bindings, as its runner bound it
//!         { "source": <string>,      // the stream (NATS) or queue (RabbitMQ)
//!           "filter": <string>,      // subject filter or routing key, "" for none
//!           "consumer": <string> }   // the durable's name: part of every record key
//!       ],                           // empty for an HTTP route, or before its runner started
//!       "handler": <string>, "file": <string>, "line": <int> }
//!   ],
//!   "exempt": [                      // deliberately unprotected routes, sorted by path, method
//!     { "method": <string|null>, "path": <string|null>, "reason": <string>,
//!       "framework": "axum"|"actix", "handler": <string>, "file": <string>, "line": <int> }
//!   ]
//! }
//! ```
//! Fields are only ever added within a version; a removal or a change of meaning bumps it.

#[cfg(test)]
use crate::policy::Identity;
use crate::policy::{ConflictMode, Part, Policy};
use crate::registry::{sorted, RouteRecord};
use serde_json::json;
use std::str::FromStr;

/// A report format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Markdown table.
    Markdown,
    /// JSON (schema above).
    Json,
    /// Self-contained HTML page.
    Html,
}

impl Format {
    /// The media type of the rendered report.
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::Markdown => "text/markdown; charset=utf-8",
            Format::Json => "application/json",
            Format::Html => "text/html; charset=utf-8",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "md" | "markdown" => Ok(Format::Markdown),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            other => Err(format!("unknown report format `{other}`: use md, json or html")),
        }
    }
}

/// Renders `routes` in `format`. Protected and exempt routes are listed apart, each group in the
/// order of [`RouteRecord::sort_key`] (the input order does not matter).
pub fn render(routes: &[&RouteRecord], format: Format) -> String {
    render_with(routes, format, Sources::Shown)
}

/// The `policies [--format md|json|html]` subcommand of an application: `None` when `args` (the
/// command line without the program's name) is not that subcommand; else the report of
/// `framework`'s routes to print (Markdown by default), or a one-line usage error.
pub fn command(framework: crate::registry::Framework, args: &[String]) -> Option<Result<String, String>> {
    if args.first().map(String::as_str) != Some("policies") {
        return None;
    }
    let usage = "usage: policies [--format md|json|html]";
    let format = match &args[1..] {
        [] => Ok(Format::Markdown),
        [flag, value] if flag == "--format" => value.parse::<Format>(),
        [flag] if flag == "--format" => Err(format!("--format needs a value: md, json or html; {usage}")),
        [other, ..] => Err(format!("unknown argument `{other}`; {usage}")),
    };
    Some(format.map(|f| render(&crate::registry::routes_of(framework), f)))
}

/// Whether a report shows where each handler is written (its source file and line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sources {
    /// File and line of each handler: for the team's own tools (the CLI, CI).
    #[default]
    Shown,
    /// Without file and line (JSON: `null`): for a report served to whoever can reach the
    /// server, to whom the source tree's layout is none of their business.
    Hidden,
}

/// [`render`], showing or hiding the handlers' source locations.
pub fn render_with(routes: &[&RouteRecord], format: Format, sources: Sources) -> String {
    let hidden: Vec<RouteRecord>;
    let routes: Vec<&RouteRecord> = match sources {
        Sources::Shown => routes.to_vec(),
        Sources::Hidden => {
            hidden = routes.iter().map(|r| RouteRecord { file: "", line: 0, ..**r }).collect();
            hidden.iter().collect()
        }
    };
    let (protected, exempt) = split(&routes);
    match format {
        Format::Json => to_json(&protected, &exempt),
        Format::Markdown => to_markdown(&protected, &exempt),
        Format::Html => to_html(&protected, &exempt),
    }
}

/// A protected route with its policy.
type Protected<'a> = (&'a RouteRecord, Policy);

fn split<'a>(routes: &[&'a RouteRecord]) -> (Vec<Protected<'a>>, Vec<(&'a RouteRecord, &'static str)>) {
    let mut protected = Vec::new();
    let mut exempt = Vec::new();
    for r in sorted(routes.to_vec()) {
        match (r.exempt, r.policy) {
            (Some(reason), _) => exempt.push((r, reason)),
            (None, Some(p)) => protected.push((r, p)),
            (None, None) => {}
        }
    }
    exempt.sort_by_key(|(r, _)| (r.path, r.method, r.handler));
    (protected, exempt)
}

/// Human form of a duration: `24h`, `90s`, `1h30m`.
pub fn human_duration(d: std::time::Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if s >= n {
            out.push_str(&format!("{}{unit}", s / n));
            s %= n;
        }
    }
    out
}

/// The request's identity as the report shows it: `path: all; query: all; body: amount, currency`
/// (a message's: its body only).
fn fields(r: &RouteRecord, p: &Policy) -> String {
    let id = p.identity;
    let body = match id.body {
        Part::Whole => "whole body".to_owned(),
        other => other.describe(),
    };
    if r.framework.is_consumer() {
        return format!("body: {body}");
    }
    format!("path: {}; query: {}; body: {body}", id.path.describe(), id.query.describe())
}

fn part_json(part: Part) -> serde_json::Value {
    match part {
        Part::Whole => json!("all"),
        Part::Only(names) => json!(names),
        Part::Omitted => json!("excluded"),
    }
}

fn route(r: &RouteRecord) -> String {
    let bound = crate::registry::bound_to(r);
    if !bound.is_empty() {
        let each = bound.iter().map(|b| {
            let filter = if b.filter.is_empty() { String::new() } else { format!(", filter {}", b.filter) };
            format!("{} {}{filter}, consumer {}", r.framework.as_str(), b.source, b.consumer)
        });
        return each.collect::<Vec<_>>().join("; ");
    }
    if r.framework.is_consumer() {
        return format!("{} consumer (not bound yet)", r.framework.as_str());
    }
    let served = crate::registry::served_at(r);
    if !served.is_empty() {
        return served.join(", ");
    }
    match (r.method, r.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        (None, Some(p)) => p.to_owned(),
        _ => "—".to_owned(),
    }
}

fn to_json(protected: &[Protected<'_>], exempt: &[(&RouteRecord, &str)]) -> String {
    let rows: Vec<_> = protected
        .iter()
        .map(|(r, p)| {
            json!({
                "scope": p.scope,
                "method": r.method,
                "path": r.path,
                "served_at": crate::registry::served_at(r),
                "fields": p.fields(),
                "identity": {
                    "path": part_json(p.identity.path),
                    "query": part_json(p.identity.query),
                    "body": part_json(p.identity.body),
                },
                "ttl_seconds": p.ttl.as_secs_f64(),
                "lease_seconds": p.lease.as_secs_f64(),
                "key": p.key.as_str(),
                "key_source": p.key_source.as_report(),
                "token_ttl_seconds": p.key_source.token_ttl().map(|t| t.as_secs_f64()),
                "on_conflict": p.on_conflict.as_str(),
                "wait_timeout_seconds": p.wait_timeout.as_secs_f64(),
                "stored_outcomes": p.outcomes.as_str(),
                "fail_open": p.fail_open,
                "transactional": p.transactional,
                "framework": r.framework.as_str(),
                "transport": r.framework.transport(),
                "consumes": crate::registry::bound_to(r).iter().map(|b| json!({
                    "source": b.source, "filter": b.filter, "consumer": b.consumer,
                })).collect::<Vec<_>>(),
                "handler": r.handler,
                "file": Some(r.file).filter(|f| !f.is_empty()),
                "line": Some(r.line).filter(|_| !r.file.is_empty()),
            })
        })
        .collect();
    let exempt_rows: Vec<_> = exempt
        .iter()
        .map(|(r, reason)| {
            json!({
                "method": r.method,
                "path": r.path,
                "reason": reason,
                "framework": r.framework.as_str(),
                "handler": r.handler,
                "file": Some(r.file).filter(|f| !f.is_empty()),
                "line": Some(r.line).filter(|_| !r.file.is_empty()),
            })
        })
        .collect();
    let doc = json!({
        "version": 1,
        "summary": { "protected": rows.len(), "exempt": exempt_rows.len() },
        "routes": rows,
        "exempt": exempt_rows,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Escapes a Markdown table cell.
fn md(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn to_markdown(protected: &[Protected<'_>], exempt: &[(&RouteRecord, &str)]) -> String {
    let mut out = String::from("# Idempotency policies\n\n");
    out.push_str(&format!("{} protected route(s), {} exempt route(s).\n\n", protected.len(), exempt.len()));
    out.push_str("## Protected routes\n\n");
    out.push_str("| scope | route | identity | ttl | lease | key | in progress | stored | handler | source |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for (r, p) in protected {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | `{}` | {} |\n",
            p.scope,
            md(&route(r)),
            md(&fields(r, p)),
            human_duration(p.ttl),
            human_duration(p.lease),
            md(&key_md(p)),
            on_conflict(r, p),
            stored(p),
            r.handler,
            source(r)
        ));
    }
    if protected.is_empty() {
        out.push_str("| — | | | | | | | | | |\n");
    }
    out.push_str("\n## Exempt routes\n\n");
    if exempt.is_empty() {
        out.push_str("None.\n");
    } else {
        out.push_str("| route | reason | handler | source |\n|---|---|---|---|\n");
        for (r, reason) in exempt {
            out.push_str(&format!("| {} | {} | `{}` | {} |\n", md(&route(r)), md(reason), r.handler, source(r)));
        }
    }
    out
}

/// The key column: the requirement, and where the key comes from unless it is the key header.
fn key_md(p: &Policy) -> String {
    match p.key_source {
        crate::policy::KeySource::Header => p.key.as_str().to_owned(),
        crate::policy::KeySource::Issued { ttl, .. } => format!(
            "{}, {} (token ttl {})",
            p.key.as_str(),
            p.key_source.describe("Idempotency-Key"),
            humantime::format_duration(ttl)
        ),
        source => format!("{}, {}", p.key.as_str(), source.describe("Idempotency-Key")),
    }
}

/// `file:line`, or `—` when hidden.
fn source(r: &RouteRecord) -> String {
    if r.file.is_empty() {
        "—".to_owned()
    } else {
        format!("{}:{}", md(r.file), r.line)
    }
}

/// The outcomes stored, and whether they commit with the handler's writes.
fn stored(p: &Policy) -> String {
    match p.transactional {
        true => format!("{}, transactional", p.outcomes.as_str()),
        false => p.outcomes.as_str().to_owned(),
    }
}

fn on_conflict(r: &RouteRecord, p: &Policy) -> String {
    if r.framework.is_consumer() {
        return "redelivered later".to_owned();
    }
    match p.on_conflict {
        ConflictMode::Reject => "reject (409)".to_owned(),
        ConflictMode::Wait => format!("wait {}", human_duration(p.wait_timeout)),
    }
}

/// Escapes text for HTML (and XML: the page is well-formed XHTML-compatible markup).
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1500px;padding:0 1.5rem;color:#1f2328;line-height:1.4}
h1{font-size:1.6rem;margin:0 0 .3rem}
h2{font-size:1.15rem;margin:2rem 0 .6rem}
p.summary{color:#57606a;margin:0 0 1rem}
.count{display:inline-block;border-radius:1rem;padding:.1rem .7rem;font-weight:600;margin-right:.4rem}
.count.ok{background:#dafbe1;color:#116329}
.count.ex{background:#fff8c5;color:#7d4e00}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border-bottom:1px solid #d0d7de;padding:.45rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;white-space:nowrap;border-top:1px solid #d0d7de}
tbody tr:hover td{background:#f6f8fa}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em}
.route{white-space:nowrap;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.method{display:inline-block;min-width:3.4rem;font-weight:700;color:#0550ae}
.src{color:#57606a;font-size:.82em;display:block;margin-top:.15rem}
td.handler code,td.handler .src{overflow-wrap:break-word}
.tag{display:inline-block;border-radius:.3rem;padding:0 .4rem;font-size:.82em;background:#eaeef2;white-space:nowrap}
.tag.warn{background:#ffebe9;color:#a40e26}
.num{white-space:nowrap}
.empty{color:#57606a;font-style:italic}
";

fn html_route(r: &RouteRecord) -> String {
    if r.framework.is_consumer() {
        return esc(&route(r));
    }
    let served = crate::registry::served_at(r);
    if !served.is_empty() {
        let routes: Vec<String> = served
            .iter()
            .map(|s| match s.split_once(' ') {
                Some((m, p)) => format!("<span class=\"method\">{}</span>{}", esc(m), esc(p)),
                None => esc(s),
            })
            .collect();
        return routes.join("<br />");
    }
    match (r.method, r.path) {
        (Some(m), Some(p)) => format!("<span class=\"method\">{}</span>{}", esc(m), esc(p)),
        (None, Some(p)) => esc(p),
        _ => "<span class=\"empty\">not declared</span>".to_owned(),
    }
}

/// Escapes `s` and lets a narrow column wrap it after each `::` and `/` only.
fn breakable(s: &str) -> String {
    esc(s).replace('/', "/<wbr />").replace("::", "::<wbr />")
}

fn html_handler(r: &RouteRecord) -> String {
    if r.file.is_empty() {
        return format!("<code>{}</code><span class=\"src\">{}</span>", breakable(r.handler), r.framework.as_str());
    }
    format!(
        "<code>{}</code><span class=\"src\">{}:{} · {}</span>",
        breakable(r.handler),
        breakable(r.file),
        r.line,
        r.framework.as_str()
    )
}

fn to_html(protected: &[Protected<'_>], exempt: &[(&RouteRecord, &str)]) -> String {
    let mut body = String::new();
    body.push_str(&format!(
        "<h1>Idempotency policies</h1>\n<p class=\"summary\"><span class=\"count ok\">{} protected</span><span class=\"count ex\">{} exempt</span> \
         Protected routes run once per <code>Idempotency-Key</code>; retries get the stored response.</p>\n",
        protected.len(),
        exempt.len()
    ));
    body.push_str("<h2>Protected routes</h2>\n");
    if protected.is_empty() {
        body.push_str("<p class=\"empty\">No protected routes.</p>\n");
    } else {
        body.push_str(
            "<table id=\"protected\">\n<thead><tr><th>route</th><th>scope</th><th>identity</th><th>ttl</th><th>lease</th>\
             <th>key</th><th>in progress</th><th>stored outcomes</th><th>store down</th><th>handler</th></tr></thead>\n<tbody>\n",
        );
        for (r, p) in protected {
            let requirement = match p.key {
                crate::policy::KeyRequirement::Required => "<span class=\"tag\">required</span>",
                crate::policy::KeyRequirement::Optional => "<span class=\"tag warn\">optional</span>",
            };
            let key = match p.key_source {
                crate::policy::KeySource::Header => requirement.to_owned(),
                crate::policy::KeySource::Issued { ttl, .. } => format!(
                    "{requirement} {} (token ttl {})",
                    esc(&p.key_source.describe("Idempotency-Key").replace('`', "")),
                    humantime::format_duration(ttl)
                ),
                source => format!("{requirement} {}", esc(&source.describe("Idempotency-Key").replace('`', ""))),
            };
            let store_down = if p.fail_open {
                "<span class=\"tag warn\">run unprotected</span>"
            } else {
                "<span class=\"tag\">503</span>"
            };
            body.push_str(&format!(
                "<tr><td class=\"route\">{}</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"handler\">{}</td></tr>\n",
                html_route(r),
                esc(p.scope),
                esc(&fields(r, p)),
                esc(&human_duration(p.ttl)),
                esc(&human_duration(p.lease)),
                key,
                esc(&on_conflict(r, p)),
                stored(p),
                store_down,
                html_handler(r),
            ));
        }
        body.push_str("</tbody>\n</table>\n");
    }
    body.push_str("<h2>Exempt routes</h2>\n");
    if exempt.is_empty() {
        body.push_str("<p class=\"empty\">No exempt routes.</p>\n");
    } else {
        body.push_str(
            "<table id=\"exempt\">\n<thead><tr><th>route</th><th>why it needs no key</th><th>handler</th></tr></thead>\n<tbody>\n",
        );
        for (r, reason) in exempt {
            body.push_str(&format!(
                "<tr><td class=\"route\">{}</td><td>{}</td><td class=\"handler\">{}</td></tr>\n",
                html_route(r),
                esc(reason),
                html_handler(r)
            ));
        }
        body.push_str("</tbody>\n</table>\n");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\" xmlns=\"http://www.w3.org/1999/xhtml\">\n<head>\n<meta charset=\"utf-8\" />\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\" />\n<title>Idempotency policies</title>\n\
         <style>\n{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{KeyRequirement, Policy};
    use crate::registry::Framework;
    use std::time::Duration;

    const A: RouteRecord = RouteRecord::protected(
        Policy {
            identity: Identity { body: Part::Only(&["amount", "currency"]), ..Identity::WHOLE },
            ..Policy::new("payments.create")
        },
        "demo::create_payment",
        "src/main.rs",
        10,
        Framework::Axum,
    )
    .at("POST", "/payments");
    const B: RouteRecord = RouteRecord::protected(
        Policy {
            key: KeyRequirement::Optional,
            on_conflict: ConflictMode::Wait,
            wait_timeout: Duration::from_secs(5),
            fail_open: true,
            ..Policy::new("a.<b>")
        },
        "demo::a",
        "src/a.rs",
        3,
        Framework::Actix,
    );
    const X: RouteRecord =
        RouteRecord::exempted("natural key: PUT | replaces <it> & more", "demo::put", "src/x.rs", 7, Framework::Axum)
            .at("PUT", "/me");

    #[test]
    fn json_follows_the_schema() {
        let json: serde_json::Value = serde_json::from_str(&render(&[&X, &A, &B], Format::Json)).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["summary"], json!({"protected": 2, "exempt": 1}));
        assert_eq!(json["routes"][0]["scope"], "a.<b>");
        assert_eq!(json["routes"][0]["method"], serde_json::Value::Null);
        assert_eq!(json["routes"][1]["scope"], "payments.create");
        assert_eq!(json["routes"][1]["ttl_seconds"], 86400.0);
        assert_eq!(json["routes"][1]["fields"][1], "currency");
        assert_eq!(
            json["routes"][1]["identity"],
            json!({"path": "all", "query": "all", "body": ["amount", "currency"]})
        );
        assert_eq!(json["routes"][1]["served_at"], json!([]));
        assert_eq!(
            json["exempt"],
            json!([{"method": "PUT", "path": "/me", "reason": "natural key: PUT | replaces <it> & more",
                    "framework": "axum", "handler": "demo::put", "file": "src/x.rs", "line": 7}])
        );
    }

    /// A report served to anyone can leave out where the handlers are written.
    #[test]
    fn sources_can_be_hidden_in_every_format() {
        let json: serde_json::Value =
            serde_json::from_str(&render_with(&[&X, &A], Format::Json, Sources::Hidden)).unwrap();
        for row in [&json["routes"][0], &json["exempt"][0]] {
            assert_eq!((&row["file"], &row["line"]), (&serde_json::Value::Null, &serde_json::Value::Null), "{row}");
            assert!(row["handler"].is_string());
        }
        for format in [Format::Markdown, Format::Html, Format::Json] {
            let shown = render_with(&[&X, &A], format, Sources::Shown);
            let hidden = render_with(&[&X, &A], format, Sources::Hidden);
            assert!(shown.contains("main.rs") && shown.contains("x.rs"), "{shown}");
            assert!(!hidden.contains("main.rs") && !hidden.contains("x.rs"), "{hidden}");
            assert_eq!(shown, render(&[&X, &A], format));
        }
    }

    #[test]
    fn the_policies_subcommand() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(command(Framework::Axum, &args(&["serve"])).is_none());
        assert!(command(Framework::Axum, &args(&[])).is_none());
        let md = command(Framework::Axum, &args(&["policies"])).unwrap().unwrap();
        assert!(md.starts_with("# Idempotency policies"), "{md}");
        let json = command(Framework::Axum, &args(&["policies", "--format", "json"])).unwrap().unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{json}");
        for (bad, needle) in [
            (&["policies", "--format"][..], "--format needs a value"),
            (&["policies", "--format", "pdf"], "unknown report format `pdf`"),
            (&["policies", "--colour"], "unknown argument `--colour`"),
        ] {
            let error = command(Framework::Axum, &args(bad)).unwrap().unwrap_err();
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn markdown_lists_both_groups() {
        let md = render(&[&A, &X], Format::Markdown);
        assert!(
            md.contains(
                "| `payments.create` | POST /payments | path: all; query: all; body: amount, currency | 1d | 10s | required |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| PUT /me | natural key: PUT \\| replaces <it> & more | `demo::put` | src/x.rs:7 |"),
            "{md}"
        );
        assert!(md.contains("1 protected route(s), 1 exempt route(s)."), "{md}");
        assert!(render(&[&A], Format::Markdown).contains("## Exempt routes\n\nNone.\n"));
    }

    /// The page is XHTML-compatible, so an XML parser checks it is well-formed: every element
    /// closed, properly nested, attributes quoted, text escaped.
    fn assert_well_formed(html: &str) {
        let mut reader = quick_xml::Reader::from_str(html);
        let mut stack: Vec<String> = Vec::new();
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Start(e)) => {
                    stack.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                    for a in e.attributes() {
                        a.unwrap();
                    }
                }
                Ok(quick_xml::events::Event::End(e)) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    assert_eq!(stack.pop().as_deref(), Some(name.as_str()), "mismatched </{name}>");
                }
                Ok(quick_xml::events::Event::Text(t)) => {
                    assert!(!t.decode().unwrap().contains('<'), "unescaped text");
                }
                Ok(quick_xml::events::Event::GeneralRef(r)) => {
                    let name = r.decode().unwrap();
                    assert!(["amp", "lt", "gt", "quot"].contains(&name.as_ref()), "undefined entity &{name};");
                }
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("not well-formed at {}: {e}\n{html}", reader.buffer_position()),
            }
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
    }

    #[test]
    fn html_is_well_formed_and_groups_routes() {
        let html = render(&[&X, &B, &A], Format::Html);
        assert_well_formed(&html);
        assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
        assert!(html.contains("<code>payments.create</code>"));
        assert!(html.contains("<code>a.&lt;b&gt;</code>"), "escaped");
        assert!(html.contains("natural key: PUT | replaces &lt;it&gt; &amp; more"));
        assert!(
            html.contains(
                "<code>demo::<wbr />create_payment</code><span class=\"src\">src/<wbr />main.rs:10 · axum</span>"
            ),
            "{html}"
        );
        let protected = html.find("id=\"protected\"").unwrap();
        let exempt = html.find("id=\"exempt\"").unwrap();
        assert!(protected < html.find("payments.create").unwrap() && html.find("payments.create").unwrap() < exempt);
        assert!(html.find("a.&lt;b&gt;").unwrap() < html.find("payments.create").unwrap(), "sorted by scope");
        let empty = render(&[], Format::Html);
        assert_well_formed(&empty);
        assert!(empty.contains("No protected routes.") && empty.contains("No exempt routes."));
    }

    #[test]
    fn durations_read_like_the_attribute() {
        assert_eq!(human_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(human_duration(Duration::from_secs(86_400 + 3_600)), "1d1h");
        assert_eq!(human_duration(Duration::from_millis(500)), "500ms");
    }
}
