//! Policy reports rendered from the registry: Markdown, JSON and a self-contained HTML page.
//!
//! JSON schema (version 1): `{"version": 1, "routes": [{"scope", "method", "path", "fields",
//! "ttl_seconds", "lease_seconds", "key", "on_conflict", "wait_timeout_seconds", "stored_outcomes",
//! "fail_open", "framework", "handler", "file", "line"}]}`; `method` and `path` are null when unknown,
//! `fields` is empty for a whole-body fingerprint. Routes are sorted by scope.

use crate::registry::RouteRecord;
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

/// Renders `routes` in `format`.
pub fn render(routes: &[&RouteRecord], format: Format) -> String {
    match format {
        Format::Json => to_json(routes),
        Format::Markdown => to_markdown(routes),
        Format::Html => to_html(routes),
    }
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

fn fields(r: &RouteRecord) -> String {
    if r.policy.fields.is_empty() {
        "(whole body)".to_owned()
    } else {
        r.policy.fields.join(", ")
    }
}

fn route(r: &RouteRecord) -> String {
    match (r.method, r.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        (None, Some(p)) => p.to_owned(),
        _ => "—".to_owned(),
    }
}

fn to_json(routes: &[&RouteRecord]) -> String {
    let rows: Vec<_> = routes
        .iter()
        .map(|r| {
            let p = &r.policy;
            json!({
                "scope": p.scope,
                "method": r.method,
                "path": r.path,
                "fields": p.fields,
                "ttl_seconds": p.ttl.as_secs_f64(),
                "lease_seconds": p.lease.as_secs_f64(),
                "key": p.key.as_str(),
                "on_conflict": p.on_conflict.as_str(),
                "wait_timeout_seconds": p.wait_timeout.as_secs_f64(),
                "stored_outcomes": p.outcomes.as_str(),
                "fail_open": p.fail_open,
                "framework": r.framework.as_str(),
                "handler": r.handler,
                "file": r.file,
                "line": r.line,
            })
        })
        .collect();
    serde_json::to_string_pretty(&json!({ "version": 1, "routes": rows })).unwrap_or_default()
}

fn to_markdown(routes: &[&RouteRecord]) -> String {
    let mut out = String::from("# Idempotency policies\n\n");
    out.push_str("| scope | route | fields | ttl | lease | key | in progress | stored | handler | source |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in routes {
        let p = &r.policy;
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | `{}` | {}:{} |\n",
            p.scope,
            route(r),
            fields(r),
            human_duration(p.ttl),
            human_duration(p.lease),
            p.key.as_str(),
            p.on_conflict.as_str(),
            p.outcomes.as_str(),
            r.handler,
            r.file,
            r.line
        ));
    }
    out.push_str(&format!("\n{} protected route(s).\n", routes.len()));
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn to_html(routes: &[&RouteRecord]) -> String {
    let mut rows = String::new();
    for r in routes {
        let p = &r.policy;
        rows.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}:{}</td></tr>\n",
            esc(p.scope),
            esc(&route(r)),
            esc(&fields(r)),
            esc(&human_duration(p.ttl)),
            esc(&human_duration(p.lease)),
            p.key.as_str(),
            p.on_conflict.as_str(),
            p.outcomes.as_str(),
            esc(r.handler),
            esc(r.file),
            r.line
        ));
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Idempotency policies</title>\n<style>\nbody{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}\ntable{{border-collapse:collapse;width:100%}}\nth,td{{border:1px solid #ccc;padding:.4rem .6rem;text-align:left;vertical-align:top}}\nth{{background:#f3f3f3}}\ntr:nth-child(even) td{{background:#fafafa}}\n</style>\n</head>\n<body>\n<h1>Idempotency policies</h1>\n<p>{} protected route(s).</p>\n<table>\n<thead><tr><th>scope</th><th>route</th><th>fields</th><th>ttl</th><th>lease</th><th>key</th><th>in progress</th><th>stored</th><th>handler</th><th>source</th></tr></thead>\n<tbody>\n{}</tbody>\n</table>\n</body>\n</html>\n",
        routes.len(),
        rows
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::registry::{validate, Framework, RegistryError};
    use std::time::Duration;

    const A: RouteRecord = RouteRecord {
        policy: Policy { fields: &["amount", "currency"], ..Policy::new("payments.create") },
        handler: "demo::create_payment",
        file: "src/main.rs",
        line: 10,
        framework: Framework::Axum,
        method: Some("POST"),
        path: Some("/payments"),
    };

    #[test]
    fn renders_every_format() {
        let json: serde_json::Value = serde_json::from_str(&render(&[&A], Format::Json)).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["routes"][0]["scope"], "payments.create");
        assert_eq!(json["routes"][0]["ttl_seconds"], 86400.0);
        assert_eq!(json["routes"][0]["fields"][1], "currency");
        let md = render(&[&A], Format::Markdown);
        assert!(md.contains("| `payments.create` | POST /payments | amount, currency | 1d | 10s | required |"), "{md}");
        let html = render(&[&A], Format::Html);
        assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
        assert!(html.contains("<code>payments.create</code>"));
    }

    #[test]
    fn durations_read_like_the_attribute() {
        assert_eq!(human_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(human_duration(Duration::from_secs(86_400 + 3_600)), "1d1h");
        assert_eq!(human_duration(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn validation_reports_each_problem() {
        let dup = RouteRecord { handler: "demo::other", ..A };
        let bad = RouteRecord {
            policy: Policy {
                lease: Duration::from_secs(100),
                ttl: Duration::from_secs(10),
                ..Policy::new("quotes.create")
            },
            ..A
        };
        let errs = validate(&[&A, &dup, &bad]).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            matches!(&errs[0], RegistryError::DuplicateScope { scope: "payments.create", handlers } if handlers.len() == 2)
        );
        assert!(errs[1].to_string().contains("lease (100s) is longer than ttl (10s)"), "{}", errs[1]);
        assert!(validate(&[&A]).is_ok());
    }
}
