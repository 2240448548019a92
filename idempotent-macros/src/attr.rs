//! The argument list of `#[idempotent(...)]`, parsed as written.
//!
//! Values keep their literals (and so their spans); [`crate::valid`] checks what they mean.

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{bracketed, Ident, LitBool, LitStr, Token};

mod kw {
    syn::custom_keyword!(scope);
    syn::custom_keyword!(fields);
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(lease);
    syn::custom_keyword!(key);
    syn::custom_keyword!(on_conflict);
    syn::custom_keyword!(wait_timeout);
    syn::custom_keyword!(store);
    syn::custom_keyword!(fail_open);
    syn::custom_keyword!(transactional);
    syn::custom_keyword!(route);
    syn::custom_keyword!(exempt);
    syn::custom_keyword!(exclude);
    syn::custom_keyword!(derived);
    syn::custom_keyword!(issued);
    syn::custom_keyword!(from);
    syn::custom_keyword!(form);
    syn::custom_keyword!(header);
}

const KEYS: &str = "`scope`, `fields`, `exclude`, `ttl`, `lease`, `key`, `on_conflict`, `wait_timeout`, `store`, \
                    `fail_open`, `transactional`, `route`, `exempt`";

/// A declared fingerprint field: a dotted path into the body, e.g. `customer.id`.
#[derive(Debug, Clone)]
pub(crate) struct FieldPath {
    pub(crate) segments: Vec<Ident>,
}

impl FieldPath {
    /// The path as written, e.g. `"customer.id"`: the field's name in the fingerprint.
    pub(crate) fn name(&self) -> String {
        self.segments.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(".")
    }
}

impl Parse for FieldPath {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut segments = vec![parse_field_ident(input)?];
        while input.peek(Token![.]) {
            input.parse::<Token![.]>()?;
            segments.push(parse_field_ident(input)?);
        }
        Ok(FieldPath { segments })
    }
}

fn parse_field_ident(input: ParseStream<'_>) -> syn::Result<Ident> {
    if input.peek(Ident) {
        input.parse()
    } else {
        Err(input.error(
            "expected a field name; `fields` lists body fields, path and query parameters, \
             e.g. `fields = [amount, customer.id, path(id), query(page)]`",
        ))
    }
}

/// One entry of `fields = [..]`: a body field, `path(name)` or `query(name)`.
#[derive(Debug, Clone)]
pub(crate) enum FieldEntry {
    /// A dotted path into the typed body.
    Body(FieldPath),
    /// A path parameter of the route.
    Path(Ident),
    /// A query parameter.
    Query(Ident),
}

impl Parse for FieldEntry {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if (input.peek(Ident) || input.peek(Token![type])) && input.peek2(syn::token::Paren) {
            let which: Ident = input.call(syn::ext::IdentExt::parse_any)?;
            let content;
            syn::parenthesized!(content in input);
            let name: Ident = content.call(syn::ext::IdentExt::parse_any).map_err(|_| {
                syn::Error::new(content.span(), format!("expected a parameter name, e.g. `{which}(id)`"))
            })?;
            if !content.is_empty() {
                return Err(content.error(format!("expected one parameter name, e.g. `{which}(id)`")));
            }
            return match which.to_string().as_str() {
                "path" => Ok(FieldEntry::Path(name)),
                "query" => Ok(FieldEntry::Query(name)),
                other => Err(syn::Error::new(
                    which.span(),
                    format!("unknown `{other}(..)` in `fields`; use `path(name)` for a path parameter or `query(name)` for a query parameter"),
                )),
            };
        }
        input.parse().map(FieldEntry::Body)
    }
}

/// `fields = [..]` with the span of its key: body fields, path and query parameters.
#[derive(Debug, Clone)]
pub(crate) struct Fields {
    pub(crate) key: Span,
    pub(crate) paths: Vec<FieldPath>,
    pub(crate) path_params: Vec<Ident>,
    pub(crate) query_params: Vec<Ident>,
}

/// `exclude = [path, query, body]`: parts of the request deliberately left out of its identity.
#[derive(Debug, Clone)]
pub(crate) struct Exclude {
    pub(crate) key: Span,
    pub(crate) parts: Vec<Ident>,
}

/// `key = ..`: the requirement (`"required"`, `"optional"`) or where the key comes from.
#[derive(Debug, Clone)]
pub(crate) enum KeyArg {
    /// `key = "required"` or `key = "optional"`: the runtime's key header.
    Requirement(StrArg),
    /// `key = header("webhook-id")`: a header of the sender's own.
    Header { key: Span, name: LitStr },
    /// `key = field(event.id)` or `key = [field(eventCode), field(pspReference)]`.
    Fields { key: Span, paths: Vec<FieldPath> },
    /// `key = derived`: the request's identity is the key.
    Derived { key: Span },
    /// `key = issued(ttl = "15m", from = form("_idem"))`: a token the server minted.
    Issued(Issued),
}

/// The arguments of `key = issued(..)`.
#[derive(Debug, Clone)]
pub(crate) struct Issued {
    /// The span of `key`.
    pub(crate) key: Span,
    /// The span of `issued`.
    pub(crate) issued: Span,
    /// `ttl = ".."`: how long a token can be submitted.
    pub(crate) ttl: Option<StrArg>,
    /// `from = form("..")` or `from = header("..")`.
    pub(crate) from: Option<TokenFrom>,
}

/// Where a submit carries its token.
#[derive(Debug, Clone)]
pub(crate) enum TokenFrom {
    /// `form("_idem")`: a field of a form-encoded body.
    Form(LitStr),
    /// `header("x-form-token")`: a request header.
    Header(LitStr),
}

const ISSUED_FORM: &str =
    "expected `issued(ttl = \"15m\", from = form(\"_idem\"))` or `from = header(\"x-form-token\")`";

impl Issued {
    fn parse(input: ParseStream<'_>, key: Span) -> syn::Result<Self> {
        let issued = input.parse::<kw::issued>()?.span;
        let mut out = Issued { key, issued, ttl: None, from: None };
        if !input.peek(syn::token::Paren) {
            return Err(syn::Error::new(issued, format!("`issued` takes where the token comes from; {ISSUED_FORM}")));
        }
        let content;
        syn::parenthesized!(content in input);
        while !content.is_empty() {
            let lookahead = content.lookahead1();
            if lookahead.peek(kw::ttl) {
                let span = content.parse::<kw::ttl>()?.span;
                let arg = str_arg(&content, span, "ttl", "\"15m\"")?;
                if out.ttl.replace(arg).is_some() {
                    return Err(syn::Error::new(span, "duplicate argument `ttl` of `issued(..)`"));
                }
            } else if lookahead.peek(kw::from) {
                let span = content.parse::<kw::from>()?.span;
                content.parse::<Token![=]>()?;
                let from = token_from(&content)?;
                if out.from.replace(from).is_some() {
                    return Err(syn::Error::new(span, "duplicate argument `from` of `issued(..)`"));
                }
            } else {
                let unknown: proc_macro2::TokenTree = content.parse()?;
                return Err(syn::Error::new(
                    unknown.span(),
                    format!("unknown argument `{unknown}` of `issued(..)`: it takes `ttl` and `from`"),
                ));
            }
            if !content.is_empty() {
                content.parse::<Token![,]>()?;
            }
        }
        if out.from.is_none() {
            return Err(syn::Error::new(
                issued,
                "`issued(..)` needs `from`: where a submit carries the token, `from = form(\"_idem\")` or `from = header(\"x-form-token\")`",
            ));
        }
        Ok(out)
    }
}

/// `form("name")` or `header("name")`.
fn token_from(input: ParseStream<'_>) -> syn::Result<TokenFrom> {
    let which = if input.peek(kw::form) {
        input.parse::<kw::form>()?;
        true
    } else if input.peek(kw::header) {
        input.parse::<kw::header>()?;
        false
    } else {
        return Err(input.error("expected `form(\"_idem\")` (a field of a form body) or `header(\"x-form-token\")`"));
    };
    let content;
    syn::parenthesized!(content in input);
    let name: LitStr = content
        .parse()
        .map_err(|e| syn::Error::new(e.span(), "expected a name as a string, e.g. `form(\"_idem\")`"))?;
    if !content.is_empty() {
        return Err(content.error("expected one name, e.g. `form(\"_idem\")`"));
    }
    Ok(if which { TokenFrom::Form(name) } else { TokenFrom::Header(name) })
}

impl KeyArg {
    /// The span of the `key` argument's name.
    pub(crate) fn key_span(&self) -> Span {
        match self {
            KeyArg::Requirement(arg) => arg.key,
            KeyArg::Header { key, .. } | KeyArg::Fields { key, .. } | KeyArg::Derived { key } => *key,
            KeyArg::Issued(issued) => issued.key,
        }
    }
}

const KEY_FORMS: &str = "expected `\"required\"`, `\"optional\"`, `header(\"name\")`, `field(path)`, \
                         `[field(a), field(b)]`, `derived` or `issued(ttl = \"15m\", from = form(\"_idem\"))`";

/// Parses what follows `key =`.
fn key_arg(input: ParseStream<'_>, key: Span) -> syn::Result<KeyArg> {
    input.parse::<Token![=]>()?;
    if input.peek(LitStr) {
        return Ok(KeyArg::Requirement(StrArg { key, value: input.parse()? }));
    }
    if input.peek(kw::derived) {
        let derived = input.parse::<kw::derived>()?;
        if input.peek(syn::token::Paren) {
            return Err(syn::Error::new(derived.span, "`derived` takes no arguments: the request itself is the key"));
        }
        return Ok(KeyArg::Derived { key });
    }
    if input.peek(kw::issued) {
        return Issued::parse(input, key).map(KeyArg::Issued);
    }
    if input.peek(syn::token::Bracket) {
        let content;
        bracketed!(content in input);
        let items = Punctuated::<KeyItem, Token![,]>::parse_terminated(&content)?;
        let mut paths = Vec::new();
        for item in items {
            match item {
                KeyItem::Field(path) => paths.push(path),
                KeyItem::Header(name) => {
                    return Err(syn::Error::new(
                        name.span(),
                        "a key comes from one header or from body fields, not both: use `key = header(..)` alone",
                    ))
                }
                KeyItem::Other(span, what) => {
                    return Err(syn::Error::new(
                        span,
                        format!("{what} cannot be part of a composite key: list body fields only, e.g. `key = [field(eventCode), field(pspReference)]`"),
                    ))
                }
            }
        }
        if paths.is_empty() {
            return Err(syn::Error::new(key, "a composite key lists at least one field, e.g. `key = [field(id)]`"));
        }
        return Ok(KeyArg::Fields { key, paths });
    }
    match input.parse::<KeyItem>()? {
        KeyItem::Field(path) => Ok(KeyArg::Fields { key, paths: vec![path] }),
        KeyItem::Header(name) => Ok(KeyArg::Header { key, name }),
        KeyItem::Other(span, _) => Err(syn::Error::new(span, KEY_FORMS)),
    }
}

/// One form after `key =` or inside its list.
enum KeyItem {
    Field(FieldPath),
    Header(LitStr),
    /// Something that is not a field, with what to call it in a message.
    Other(Span, &'static str),
}

impl Parse for KeyItem {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(kw::derived) {
            let derived = input.parse::<kw::derived>()?;
            return Ok(KeyItem::Other(derived.span, "`derived`"));
        }
        if input.peek(kw::issued) {
            let issued = input.parse::<kw::issued>()?;
            if input.peek(syn::token::Paren) {
                let _content;
                syn::parenthesized!(_content in input);
            }
            return Ok(KeyItem::Other(issued.span, "a server-issued token"));
        }
        if input.peek(LitStr) {
            let lit: LitStr = input.parse()?;
            return Ok(KeyItem::Other(lit.span(), "a string"));
        }
        let which: Ident =
            input.call(syn::ext::IdentExt::parse_any).map_err(|e| syn::Error::new(e.span(), KEY_FORMS))?;
        if !input.peek(syn::token::Paren) {
            return Err(syn::Error::new(which.span(), KEY_FORMS));
        }
        let content;
        syn::parenthesized!(content in input);
        match which.to_string().as_str() {
            "field" => {
                let path: FieldPath = content.parse()?;
                if !content.is_empty() {
                    return Err(content.error("expected one body field, e.g. `field(event.id)`"));
                }
                Ok(KeyItem::Field(path))
            }
            "header" => {
                if !content.peek(LitStr) {
                    return Err(content.error("expected the header's name as a string, e.g. `header(\"webhook-id\")`"));
                }
                let name: LitStr = content.parse()?;
                if !content.is_empty() {
                    return Err(content.error("expected one header name, e.g. `header(\"webhook-id\")`"));
                }
                Ok(KeyItem::Header(name))
            }
            _ => Err(syn::Error::new(which.span(), KEY_FORMS)),
        }
    }
}

/// A string-valued argument with the span of its key.
#[derive(Debug, Clone)]
pub(crate) struct StrArg {
    pub(crate) key: Span,
    pub(crate) value: LitStr,
}

/// Everything written inside `#[idempotent(...)]`; absent keys are `None`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Args {
    pub(crate) scope: Option<StrArg>,
    pub(crate) fields: Option<Fields>,
    pub(crate) exclude: Option<Exclude>,
    pub(crate) ttl: Option<StrArg>,
    pub(crate) lease: Option<StrArg>,
    pub(crate) key: Option<KeyArg>,
    pub(crate) on_conflict: Option<StrArg>,
    pub(crate) wait_timeout: Option<StrArg>,
    pub(crate) store: Option<StrArg>,
    pub(crate) fail_open: Option<LitBool>,
    pub(crate) transactional: Option<LitBool>,
    pub(crate) route: Option<StrArg>,
    pub(crate) exempt: Option<StrArg>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            if lookahead.peek(kw::scope) {
                let key = input.parse::<kw::scope>()?.span;
                set(&mut args.scope, "scope", key, str_arg(input, key, "scope", "\"payments.create\"")?)?;
            } else if lookahead.peek(kw::fields) {
                let key = input.parse::<kw::fields>()?.span;
                input.parse::<Token![=]>()?;
                if !input.peek(syn::token::Bracket) {
                    return Err(input.error("expected a list of body fields, e.g. `fields = [amount, customer.id]`"));
                }
                let content;
                bracketed!(content in input);
                let entries = Punctuated::<FieldEntry, Token![,]>::parse_terminated(&content)?;
                let mut fields = Fields { key, paths: Vec::new(), path_params: Vec::new(), query_params: Vec::new() };
                for entry in entries {
                    match entry {
                        FieldEntry::Body(path) => fields.paths.push(path),
                        FieldEntry::Path(name) => fields.path_params.push(name),
                        FieldEntry::Query(name) => fields.query_params.push(name),
                    }
                }
                set(&mut args.fields, "fields", key, fields)?;
            } else if lookahead.peek(kw::exclude) {
                let key = input.parse::<kw::exclude>()?.span;
                input.parse::<Token![=]>()?;
                if !input.peek(syn::token::Bracket) {
                    return Err(input.error("expected a list of request parts, e.g. `exclude = [query]`"));
                }
                let content;
                bracketed!(content in input);
                let parts = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
                set(&mut args.exclude, "exclude", key, Exclude { key, parts: parts.into_iter().collect() })?;
            } else if lookahead.peek(kw::ttl) {
                let key = input.parse::<kw::ttl>()?.span;
                set(&mut args.ttl, "ttl", key, str_arg(input, key, "ttl", "\"24h\"")?)?;
            } else if lookahead.peek(kw::lease) {
                let key = input.parse::<kw::lease>()?.span;
                set(&mut args.lease, "lease", key, str_arg(input, key, "lease", "\"10s\"")?)?;
            } else if lookahead.peek(kw::key) {
                let key = input.parse::<kw::key>()?.span;
                set(&mut args.key, "key", key, key_arg(input, key)?)?;
            } else if lookahead.peek(kw::on_conflict) {
                let key = input.parse::<kw::on_conflict>()?.span;
                set(&mut args.on_conflict, "on_conflict", key, str_arg(input, key, "on_conflict", "\"wait\"")?)?;
            } else if lookahead.peek(kw::wait_timeout) {
                let key = input.parse::<kw::wait_timeout>()?.span;
                set(&mut args.wait_timeout, "wait_timeout", key, str_arg(input, key, "wait_timeout", "\"30s\"")?)?;
            } else if lookahead.peek(kw::store) {
                let key = input.parse::<kw::store>()?.span;
                set(&mut args.store, "store", key, str_arg(input, key, "store", "\"success\"")?)?;
            } else if lookahead.peek(kw::fail_open) {
                let key = input.parse::<kw::fail_open>()?.span;
                input.parse::<Token![=]>()?;
                if !input.peek(LitBool) {
                    return Err(input.error("expected `true` or `false`, e.g. `fail_open = true`"));
                }
                set(&mut args.fail_open, "fail_open", key, input.parse()?)?;
            } else if lookahead.peek(kw::transactional) {
                let key = input.parse::<kw::transactional>()?.span;
                input.parse::<Token![=]>()?;
                if !input.peek(LitBool) {
                    return Err(input.error("expected `true` or `false`, e.g. `transactional = true`"));
                }
                set(&mut args.transactional, "transactional", key, input.parse()?)?;
            } else if lookahead.peek(kw::route) {
                let key = input.parse::<kw::route>()?.span;
                set(&mut args.route, "route", key, str_arg(input, key, "route", "\"POST /payments\"")?)?;
            } else if lookahead.peek(kw::exempt) {
                let key = input.parse::<kw::exempt>()?.span;
                set(&mut args.exempt, "exempt", key, str_arg(input, key, "exempt", "\"read-only despite POST\"")?)?;
            } else if input.peek(Ident) {
                let unknown: Ident = input.parse()?;
                return Err(syn::Error::new(
                    unknown.span(),
                    format!("unknown argument `{unknown}` of #[idempotent]; expected one of {KEYS}"),
                ));
            } else {
                return Err(lookahead.error());
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(args)
    }
}

/// Parses `= "literal"` after `name`, with an example in the error when the value is not a string.
fn str_arg(input: ParseStream<'_>, key: Span, name: &str, example: &str) -> syn::Result<StrArg> {
    input.parse::<Token![=]>()?;
    if !input.peek(LitStr) {
        return Err(input.error(format!("expected a string literal, e.g. `{name} = {example}`")));
    }
    Ok(StrArg { key, value: input.parse()? })
}

fn set<T>(slot: &mut Option<T>, name: &str, key: Span, value: T) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(key, format!("duplicate argument `{name}` of #[idempotent]")));
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        syn::parse_str::<Args>(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_key() {
        let args: Args = syn::parse_str(
            r#"scope = "payments.create", fields = [amount, customer.id], ttl = "24h", lease = "10s",
               key = "optional", on_conflict = "wait", wait_timeout = "5s", store = "all",
               fail_open = true, route = "POST /payments","#,
        )
        .unwrap();
        assert_eq!(args.scope.unwrap().value.value(), "payments.create");
        let names: Vec<String> = args.fields.unwrap().paths.iter().map(FieldPath::name).collect();
        assert_eq!(names, ["amount", "customer.id"]);
        assert_eq!(args.ttl.unwrap().value.value(), "24h");
        assert!(args.fail_open.unwrap().value);
        assert_eq!(args.route.unwrap().value.value(), "POST /payments");
    }

    #[test]
    fn empty_list_parses() {
        let args: Args = syn::parse_str("").unwrap();
        assert!(args.scope.is_none());
    }

    #[test]
    fn rejects_unknown_duplicate_and_mistyped() {
        assert!(err(r#"scope = "a", tll = "1h""#).starts_with("unknown argument `tll`"));
        assert!(err(r#"scope = "a", scope = "b""#).starts_with("duplicate argument `scope`"));
        assert!(err("scope = payments").starts_with("expected a string literal"));
        assert!(err(r#"fail_open = "yes""#).starts_with("expected `true` or `false`"));
        assert!(err("fields = amount").starts_with("expected a list of body fields"));
        assert!(err("fields = [amount.]").contains("expected a field name"));
        assert!(err(r#"scope = "a" ttl = "1h""#).starts_with("expected `,`"));
        assert!(err("fields = [header(x)]").starts_with("unknown `header(..)` in `fields`"));
        assert!(err("fields = [path(a, b)]").starts_with("expected one parameter name"));
        assert!(err("exclude = query").starts_with("expected a list of request parts"));
    }

    #[test]
    fn fields_name_body_path_and_query_values() {
        let args: Args =
            syn::parse_str("fields = [amount, path(id), customer.id, query(page)], exclude = [body]").unwrap();
        let fields = args.fields.unwrap();
        let names: Vec<String> = fields.paths.iter().map(FieldPath::name).collect();
        assert_eq!(names, ["amount", "customer.id"]);
        assert_eq!(fields.path_params[0], "id");
        assert_eq!(fields.query_params[0], "page");
        assert_eq!(args.exclude.unwrap().parts[0], "body");
    }
}
