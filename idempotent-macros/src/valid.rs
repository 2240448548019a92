//! Checks what the arguments mean and turns them into a [`Spec`] the expansion can emit as a
//! constant. Every problem becomes an error at the offending key or value; all of them are
//! reported together.

use crate::attr::{Args, Exclude, FieldPath, Fields, KeyArg, StrArg, TokenFrom};
use crate::duration::{self, Millis};
use proc_macro2::Span;
use syn::LitStr;

/// Longest accepted scope, in bytes.
const MAX_SCOPE_LEN: usize = 100;

/// Defaults, the same as `idempotent_core::policy::Policy::new`.
const DEFAULT_TTL: (Millis, &str) = (Millis(24 * 60 * 60 * 1000), "24h");
const DEFAULT_LEASE: (Millis, &str) = (Millis(10 * 1000), "10s");
/// The shortest lease accepted at compile time; the start-up check against the store's operation
/// timeout is usually stricter (see `idempotent_core::engine::Config::store_timeout`).
const MIN_LEASE: Millis = Millis(1000);
const DEFAULT_WAIT_TIMEOUT: Millis = Millis(30 * 1000);
/// The default life of a server-issued token.
const DEFAULT_TOKEN_TTL: (Millis, &str) = (Millis(15 * 60 * 1000), "15m");

/// Whether `value` is an HTTP token (a header name).
fn is_token(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Mirrors `idempotent_core::policy::KeyRequirement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRequirement {
    Required,
    Optional,
}

/// Mirrors `idempotent_core::policy::KeySource`.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    Header,
    NamedHeader(LitStr),
    Fields(Vec<FieldPath>),
    Derived,
    /// A server-issued token, valid for the duration, read from a form field or a header.
    Issued {
        ttl: Millis,
        from: TokenFrom,
    },
}

/// Mirrors `idempotent_core::policy::ConflictMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConflictMode {
    Reject,
    Wait,
}

/// Mirrors `idempotent_core::policy::StoredOutcomes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoredOutcomes {
    Final,
    Success,
    All,
}

/// An HTTP method and path, from `route = "POST /payments"` or a framework routing attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) method: String,
    pub(crate) path: String,
}

/// A validated policy: every value is known to be well formed.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) scope: LitStr,
    pub(crate) fields: Option<Fields>,
    pub(crate) excluded: Excluded,
    pub(crate) ttl: Millis,
    pub(crate) lease: Millis,
    pub(crate) key: KeyRequirement,
    pub(crate) key_source: KeySource,
    pub(crate) on_conflict: ConflictMode,
    pub(crate) wait_timeout: Millis,
    pub(crate) outcomes: StoredOutcomes,
    pub(crate) fail_open: bool,
    pub(crate) transactional: bool,
    pub(crate) route: Option<Route>,
}

/// The parts of the request `exclude = [..]` leaves out of its identity.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Excluded {
    pub(crate) path: bool,
    pub(crate) query: bool,
    pub(crate) body: bool,
}

/// A route deliberately left unprotected: `#[idempotent(exempt = "reason", route = "...")]`.
#[derive(Debug, Clone)]
pub(crate) struct Exemption {
    pub(crate) reason: LitStr,
    pub(crate) route: Option<Route>,
}

/// What the attribute declares: a protected route or an exemption.
#[derive(Debug, Clone)]
pub(crate) enum Validated {
    Protected(Spec),
    Exempt(Exemption),
}

/// Collects errors so that one pass reports every problem.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn add(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    pub(crate) fn finish<T>(self, value: T) -> syn::Result<T> {
        match self.0 {
            Some(error) => Err(error),
            None => Ok(value),
        }
    }
}

/// Validates `args`, filling in the defaults of `Policy::new` for absent keys. Every problem found
/// is reported, combined into one error.
pub(crate) fn validate(args: Args) -> syn::Result<Validated> {
    match args.exempt.clone() {
        Some(exempt) => validate_exemption(args, exempt).map(Validated::Exempt),
        None => validate_policy(args).map(Validated::Protected),
    }
}

/// An exemption takes a non-empty reason and a route, and no policy argument.
fn validate_exemption(args: Args, exempt: StrArg) -> syn::Result<Exemption> {
    let mut errors = Errors::default();
    if exempt.value.value().trim().is_empty() {
        errors.add(exempt.value.span(), "`exempt` needs a reason, e.g. `exempt = \"read-only despite POST\"`");
    }
    let key = |arg: &Option<StrArg>| arg.as_ref().map(|a| a.key);
    let policy_keys = [
        ("scope", key(&args.scope)),
        ("fields", args.fields.as_ref().map(|f| f.key)),
        ("exclude", args.exclude.as_ref().map(|e| e.key)),
        ("ttl", key(&args.ttl)),
        ("lease", key(&args.lease)),
        ("key", args.key.as_ref().map(KeyArg::key_span)),
        ("on_conflict", key(&args.on_conflict)),
        ("wait_timeout", key(&args.wait_timeout)),
        ("store", key(&args.store)),
        ("fail_open", args.fail_open.as_ref().map(|b| b.span)),
        ("transactional", args.transactional.as_ref().map(|b| b.span)),
    ];
    for (name, span) in policy_keys {
        if let Some(span) = span {
            errors.add(span, format!("`{name}` does not apply to an `exempt` route; remove `{name}` or `exempt`"));
        }
    }
    let route = route_arg(args.route.as_ref(), &mut errors);
    errors.finish(Exemption { reason: exempt.value, route })
}

fn route_arg(route: Option<&StrArg>, errors: &mut Errors) -> Option<Route> {
    let route = route?;
    match parse_route(&route.value.value()) {
        Ok(parsed) => Some(parsed),
        Err(reason) => {
            errors.add(route.value.span(), format!("invalid `route` {:?}: {reason}", route.value.value()));
            None
        }
    }
}

fn validate_policy(args: Args) -> syn::Result<Spec> {
    let mut errors = Errors::default();

    let scope = match args.scope {
        Some(StrArg { value, .. }) => {
            if let Err(reason) = check_scope(&value.value()) {
                errors.add(value.span(), format!("invalid scope {:?}: {reason}", value.value()));
            }
            value
        }
        None => {
            errors.add(
                Span::call_site(),
                "#[idempotent] needs a `scope`, e.g. #[idempotent(scope = \"payments.create\")]",
            );
            LitStr::new("", Span::call_site())
        }
    };

    if let Some(fields) = &args.fields {
        check_fields(fields, &mut errors);
    }
    let excluded = check_exclude(args.exclude.as_ref(), args.fields.as_ref(), &mut errors);

    let ttl = duration_arg(args.ttl.as_ref(), "ttl", DEFAULT_TTL, &mut errors);
    let lease = duration_arg(args.lease.as_ref(), "lease", DEFAULT_LEASE, &mut errors);
    if let (Some(lease), Some(arg)) = (&lease, &args.lease) {
        if lease.0 .0 < MIN_LEASE.0 {
            errors.add(
                arg.value.span(),
                format!(
                    "`lease` ({}) is shorter than the minimum of 1s: the claim is renewed every sixth of its lease and \
                     each renewal may wait for the store's operation timeout, so the lease must be at least 6 times \
                     that timeout (checked at start-up; the default timeout of 1s needs a lease of 6s)",
                    lease.1
                ),
            );
        }
    }
    if let (Some(ttl), Some(lease)) = (&ttl, &lease) {
        if lease.0 > ttl.0 {
            let span = args.lease.as_ref().map_or_else(Span::call_site, |l| l.value.span());
            errors.add(
                span,
                format!(
                    "`lease` ({}) is longer than `ttl` ({}{}); an in-progress claim must expire before its record",
                    lease.1,
                    ttl.1,
                    if args.ttl.is_none() { ", the default" } else { "" },
                ),
            );
        }
    }
    let wait_timeout =
        duration_arg(args.wait_timeout.as_ref(), "wait_timeout", (DEFAULT_WAIT_TIMEOUT, "30s"), &mut errors);

    let requirement = match &args.key {
        Some(KeyArg::Requirement(arg)) => Some(arg),
        _ => None,
    };
    let key = one_of(
        requirement,
        "key",
        &[("required", KeyRequirement::Required), ("optional", KeyRequirement::Optional)],
        &mut errors,
    )
    .unwrap_or(KeyRequirement::Required);
    let key_source = match &args.key {
        None | Some(KeyArg::Requirement(_)) => KeySource::Header,
        Some(KeyArg::Header { name, .. }) => {
            let value = name.value();
            let token = !value.is_empty()
                && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                errors.add(
                    name.span(),
                    format!("`{value}` is not a header name: use letters, digits and `-` (an HTTP token), e.g. `header(\"webhook-id\")`"),
                );
            }
            KeySource::NamedHeader(LitStr::new(&value.to_ascii_lowercase(), name.span()))
        }
        Some(KeyArg::Fields { paths, .. }) => KeySource::Fields(paths.clone()),
        Some(KeyArg::Derived { .. }) => KeySource::Derived,
        Some(KeyArg::Issued(issued)) => {
            let token_ttl = duration_arg(issued.ttl.as_ref(), "ttl", DEFAULT_TOKEN_TTL, &mut errors);
            let from = match &issued.from {
                Some(TokenFrom::Header(name)) => {
                    let value = name.value();
                    if !is_token(&value) {
                        errors.add(
                            name.span(),
                            format!("`{value}` is not a header name: use letters, digits and `-` (an HTTP token), e.g. `header(\"x-form-token\")`"),
                        );
                    }
                    TokenFrom::Header(LitStr::new(&value.to_ascii_lowercase(), name.span()))
                }
                Some(TokenFrom::Form(name)) => {
                    if name.value().is_empty() {
                        errors.add(name.span(), "a form field's name cannot be empty, e.g. `form(\"_idem\")`");
                    }
                    TokenFrom::Form(name.clone())
                }
                // The parser refuses `issued(..)` without `from`.
                None => TokenFrom::Form(LitStr::new("_idem", issued.issued)),
            };
            let route_ttl = ttl.as_ref().map_or(DEFAULT_TTL.0, |t| t.0);
            if let Some((token_ttl, _)) = token_ttl {
                if token_ttl.0 == 0 {
                    errors.add(
                        issued.ttl.as_ref().map_or(issued.issued, |t| t.value.span()),
                        "a token `ttl` of zero could never be submitted; use e.g. \"15m\"",
                    );
                } else if token_ttl.0 > route_ttl.0 {
                    errors.add(
                        issued.ttl.as_ref().map_or(issued.issued, |t| t.value.span()),
                        "the token outlives the route's `ttl`: a form resubmitted after the outcome is forgotten would run again; make the route's `ttl` at least the token's",
                    );
                }
            }
            KeySource::Issued { ttl: token_ttl.map_or(DEFAULT_TOKEN_TTL.0, |t| t.0), from }
        }
    };
    let on_conflict = one_of(
        args.on_conflict.as_ref(),
        "on_conflict",
        &[("reject", ConflictMode::Reject), ("wait", ConflictMode::Wait)],
        &mut errors,
    );
    let outcomes = one_of(
        args.store.as_ref(),
        "store",
        &[("final", StoredOutcomes::Final), ("success", StoredOutcomes::Success), ("all", StoredOutcomes::All)],
        &mut errors,
    )
    .unwrap_or(StoredOutcomes::Final);

    // Only complain when `on_conflict` is valid but not `wait`: a misspelt value already has its error.
    if let Some(wait) = &args.wait_timeout {
        let invalid_conflict = args.on_conflict.is_some() && on_conflict.is_none();
        if on_conflict != Some(ConflictMode::Wait) && !invalid_conflict {
            errors.add(
                wait.key,
                "`wait_timeout` only applies with `on_conflict = \"wait\"`; add that or remove `wait_timeout`",
            );
        }
    }

    let fail_open = args.fail_open.is_some_and(|b| b.value);
    if let Some(transactional) = args.transactional.as_ref().filter(|t| t.value) {
        if fail_open {
            errors.add(
                transactional.span,
                "`transactional` needs the store: it cannot run unprotected, as `fail_open = true` would when the \
                 store is unreachable; remove one",
            );
        }
        if key == KeyRequirement::Optional {
            errors.add(
                transactional.span,
                "`transactional` needs a key (the outcome commits with the key's record): remove `key = \"optional\"`",
            );
        }
    }

    let route = route_arg(args.route.as_ref(), &mut errors);

    errors.finish(Spec {
        scope,
        fields: args.fields,
        excluded,
        ttl: ttl.map_or(DEFAULT_TTL.0, |t| t.0),
        lease: lease.map_or(DEFAULT_LEASE.0, |l| l.0),
        key,
        key_source,
        on_conflict: on_conflict.unwrap_or(ConflictMode::Reject),
        wait_timeout: wait_timeout.map_or(DEFAULT_WAIT_TIMEOUT, |w| w.0),
        outcomes,
        fail_open,
        transactional: args.transactional.is_some_and(|b| b.value),
        route,
    })
}

/// Checks a scope: dot-separated segments of lowercase ASCII letters, digits and `_`.
pub(crate) fn check_scope(scope: &str) -> Result<(), String> {
    const FORMAT: &str =
        "use lowercase ASCII letters, digits and `_`, in segments separated by dots, e.g. \"payments.create\"";
    if scope.is_empty() {
        return Err(format!("a scope cannot be empty; {FORMAT}"));
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(format!("a scope is at most {MAX_SCOPE_LEN} characters, this one has {}", scope.len()));
    }
    if scope.split('.').any(str::is_empty) {
        return Err(format!("empty segment; {FORMAT}"));
    }
    if let Some(bad) = scope.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '.')) {
        return Err(format!("`{bad}` is not allowed; {FORMAT}"));
    }
    Ok(())
}

fn check_fields(fields: &Fields, errors: &mut Errors) {
    if fields.paths.is_empty() && fields.path_params.is_empty() && fields.query_params.is_empty() {
        errors.add(
            fields.key,
            "`fields` is empty; list body fields (or `path(name)`, `query(name)`), or remove `fields` to fingerprint the whole request",
        );
    }
    let mut seen = Vec::new();
    for path in &fields.paths {
        let name = path.name();
        if seen.contains(&name) {
            errors.add(path.segments[0].span(), format!("field `{name}` is listed twice in `fields`"));
        } else {
            seen.push(name);
        }
    }
    for (which, names) in [("path", &fields.path_params), ("query", &fields.query_params)] {
        let mut seen = Vec::new();
        for name in names {
            if seen.contains(&name) {
                errors.add(name.span(), format!("`{which}({name})` is listed twice in `fields`"));
            } else {
                seen.push(name);
            }
        }
    }
}

/// `exclude = [..]` names each of `path`, `query` and `body` at most once, and never a part that
/// `fields` also selects from.
fn check_exclude(exclude: Option<&Exclude>, fields: Option<&Fields>, errors: &mut Errors) -> Excluded {
    let mut excluded = Excluded::default();
    let Some(exclude) = exclude else { return excluded };
    if exclude.parts.is_empty() {
        errors.add(
            exclude.key,
            "`exclude` is empty; name the parts left out of the request's identity: `path`, `query` or `body`",
        );
    }
    for part in &exclude.parts {
        let (slot, selected) = match part.to_string().as_str() {
            "path" => (&mut excluded.path, fields.is_some_and(|f| !f.path_params.is_empty())),
            "query" => (&mut excluded.query, fields.is_some_and(|f| !f.query_params.is_empty())),
            "body" => (&mut excluded.body, fields.is_some_and(|f| !f.paths.is_empty())),
            other => {
                errors.add(
                    part.span(),
                    format!("unknown request part `{other}` in `exclude`; expected `path`, `query` or `body`"),
                );
                continue;
            }
        };
        if *slot {
            errors.add(part.span(), format!("`{part}` is listed twice in `exclude`"));
        }
        *slot = true;
        if selected {
            errors.add(
                part.span(),
                format!("`{part}` is excluded, but `fields` names values of it; remove one of the two"),
            );
        }
    }
    excluded
}

/// Parses an optional duration argument; `None` means it was invalid (and an error was recorded).
fn duration_arg(
    arg: Option<&StrArg>,
    name: &str,
    default: (Millis, &str),
    errors: &mut Errors,
) -> Option<(Millis, String)> {
    let Some(arg) = arg else {
        return Some((default.0, format!("\"{}\"", default.1)));
    };
    let text = arg.value.value();
    match duration::parse(&text) {
        Ok(ms) => Some((ms, format!("{text:?}"))),
        Err(error) => {
            errors.add(arg.value.span(), format!("`{name}` {error}"));
            None
        }
    }
}

/// Maps a string argument onto one of `choices`; `None` when absent or invalid.
fn one_of<T: Copy>(arg: Option<&StrArg>, name: &str, choices: &[(&str, T)], errors: &mut Errors) -> Option<T> {
    let arg = arg?;
    let text = arg.value.value();
    if let Some((_, value)) = choices.iter().find(|(choice, _)| *choice == text) {
        return Some(*value);
    }
    let expected: Vec<String> = choices.iter().map(|(choice, _)| format!("\"{choice}\"")).collect();
    let expected = match expected.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    errors.add(arg.value.span(), format!("unknown `{name}` value {text:?}; expected {expected}"));
    None
}

/// Parses `"METHOD /path"`.
pub(crate) fn parse_route(text: &str) -> Result<Route, String> {
    const FORMAT: &str = "write \"METHOD /path\", e.g. \"POST /payments\"";
    let Some((method, path)) = text.split_once(' ') else {
        return Err(format!("expected a method and a path; {FORMAT}"));
    };
    if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(format!("the method must be uppercase letters; {FORMAT}"));
    }
    check_path(path).map_err(|reason| format!("{reason}; {FORMAT}"))?;
    Ok(Route { method: method.to_owned(), path: path.to_owned() })
}

/// A route path starts with `/` and has no whitespace or control characters.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("the path must start with `/`".to_owned());
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the path cannot contain whitespace".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> syn::Result<Spec> {
        validate(syn::parse_str(text).unwrap()).map(|v| match v {
            Validated::Protected(spec) => spec,
            Validated::Exempt(_) => panic!("not a policy"),
        })
    }

    fn error(text: &str) -> String {
        spec(text).unwrap_err().into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn defaults_match_policy_new() {
        let s = spec(r#"scope = "payments.create""#).unwrap();
        assert_eq!(s.ttl, Millis(86_400_000));
        assert_eq!(s.lease, Millis(10_000));
        assert_eq!(s.wait_timeout, Millis(30_000));
        assert_eq!(s.key, KeyRequirement::Required);
        assert_eq!(s.on_conflict, ConflictMode::Reject);
        assert_eq!(s.outcomes, StoredOutcomes::Final);
        assert!(!s.fail_open);
        assert!(s.route.is_none());
    }

    #[test]
    fn scopes() {
        for ok in ["payments", "payments.create", "v2.orders_refund.x9", &"a".repeat(100)] {
            assert_eq!(check_scope(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Payments", "payments..create", ".a", "a.", "a-b", "a b", "é", &"a".repeat(101)] {
            assert!(check_scope(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("POST /payments"), Ok(Route { method: "POST".into(), path: "/payments".into() }));
        for bad in ["POST", "post /p", "POST p", "POST /a b", " /p", "POST  /p"] {
            assert!(parse_route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn collects_every_error() {
        let e = error(r#"scope = "Bad", ttl = "0s", key = "maybe""#);
        assert!(e.contains("invalid scope \"Bad\""), "{e}");
        assert!(e.contains("`ttl` must be greater than zero"), "{e}");
        assert!(e.contains("unknown `key` value \"maybe\"; expected \"required\" or \"optional\""), "{e}");
    }

    #[test]
    fn lease_and_wait_rules() {
        assert!(error(r#"scope = "a", ttl = "5s""#).contains("`lease` (\"10s\") is longer than `ttl` (\"5s\")"));
        assert!(error(r#"scope = "a", lease = "2d""#).contains("(\"24h\", the default)"));
        assert!(error(r#"scope = "a", wait_timeout = "5s""#).contains("only applies with `on_conflict = \"wait\"`"));
        assert!(spec(r#"scope = "a", on_conflict = "wait", wait_timeout = "5s", lease = "5s", ttl = "5s""#).is_ok());
        // A misspelt `on_conflict` gives one error, not two.
        assert_eq!(
            spec(r#"scope = "a", on_conflict = "wiat", wait_timeout = "5s""#).unwrap_err().into_iter().count(),
            1
        );
    }

    #[test]
    fn exemptions() {
        let v = validate(syn::parse_str(r#"exempt = "read-only", route = "POST /search""#).unwrap()).unwrap();
        let Validated::Exempt(e) = v else { panic!("not an exemption") };
        assert_eq!(e.reason.value(), "read-only");
        assert_eq!(e.route, Some(Route { method: "POST".into(), path: "/search".into() }));
        let e = error(r#"exempt = " ", scope = "a", fail_open = true"#);
        assert!(e.contains("`exempt` needs a reason"), "{e}");
        assert!(e.contains("`scope` does not apply to an `exempt` route"), "{e}");
        assert!(e.contains("`fail_open` does not apply"), "{e}");
    }

    #[test]
    fn missing_scope() {
        assert!(error("").contains("needs a `scope`"));
    }
}
