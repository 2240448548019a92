//! Rewrites an annotated handler and emits its registry record.
//!
//! The user's function is kept verbatim, nested inside a wrapper of the same name, so every type
//! error in it still points at the user's code. The wrapper takes the same arguments plus the
//! adapter's context extractor, fingerprints the body, and hands the inner call to the adapter's
//! `run`.

use crate::attr::{Args, FieldPath};
use crate::duration::Millis;
use crate::valid::{self, ConflictMode, Errors, KeyRequirement, Route, Spec, StoredOutcomes, Validated};
use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, FnArg, GenericArgument, Ident, ItemFn, LitStr, PathArguments, Token, Type, Visibility};

/// The web framework a macro entry point serves, and where its runtime support lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framework {
    /// `idempotent-axum`.
    Axum,
    /// `idempotent-actix`.
    Actix,
}

impl Framework {
    /// The hidden module of the adapter that generated code refers to.
    fn runtime(self) -> TokenStream {
        match self {
            Framework::Axum => quote!(::idempotent_axum::__private),
            Framework::Actix => quote!(::idempotent_actix::__private),
        }
    }

    fn variant(self) -> Ident {
        match self {
            Framework::Axum => format_ident!("Axum"),
            Framework::Actix => format_ident!("Actix"),
        }
    }
}

/// Expands `#[idempotent(attr)] item`. On any error the item is emitted unchanged next to the
/// errors, so the only messages the user sees are about the mistake itself.
pub(crate) fn idempotent(framework: Framework, attr: TokenStream, item: TokenStream) -> TokenStream {
    match try_expand(framework, attr, item.clone()) {
        Ok(tokens) => tokens,
        Err(error) => {
            let errors = error.to_compile_error();
            quote!(#item #errors)
        }
    }
}

fn try_expand(framework: Framework, attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let validated = match syn::parse2::<Args>(attr) {
        Ok(args) => valid::validate(args).map_err(|e| errors.push(e)).ok(),
        Err(error) => {
            errors.push(error);
            None
        }
    };
    let func = match syn::parse2::<ItemFn>(item) {
        Ok(func) => Some(func),
        Err(_) => {
            errors.add(Span::call_site(), "#[idempotent] applies to an `async fn` request handler");
            None
        }
    };
    match validated {
        Some(Validated::Protected(mut spec)) => {
            let handler = func.as_ref().and_then(|func| {
                let fields_key = spec.fields.as_ref().map(|f| f.key);
                Handler::inspect(func, fields_key).map_err(|e| errors.push(e)).ok()
            });
            let (Some(func), Some(handler)) = (func, handler) else {
                return errors.finish(TokenStream::new());
            };
            if spec.route.is_none() && framework == Framework::Actix {
                spec.route = actix_route(&func.attrs);
            }
            errors.finish(emit(framework, &spec, &func, &handler))
        }
        Some(Validated::Exempt(mut exemption)) => {
            let Some(func) = func else {
                return errors.finish(TokenStream::new());
            };
            if exemption.route.is_none() && framework == Framework::Actix {
                exemption.route = actix_route(&func.attrs);
            }
            match &exemption.route {
                Some(route) => errors.finish(emit_exempt(framework, &exemption.reason, route, &func)),
                None => {
                    let hint = match framework {
                        Framework::Axum => "add `route = \"METHOD /path\"`",
                        Framework::Actix => {
                            "add `route = \"METHOD /path\"` or an actix-web routing attribute below this one"
                        }
                    };
                    errors.add(
                        Span::call_site(),
                        format!("an `exempt` route needs its method and path so enforcement can recognise it; {hint}"),
                    );
                    errors.finish(TokenStream::new())
                }
            }
        }
        None => errors.finish(TokenStream::new()),
    }
}

/// An exempt handler is left as written; only its record is emitted.
fn emit_exempt(framework: Framework, reason: &LitStr, route: &Route, func: &ItemFn) -> TokenStream {
    let rt = framework.runtime();
    let record = record(framework, &rt, "exempted", quote!(#reason), Some(route), &func.sig.ident);
    quote!(#func #record)
}

/// What the expansion needs to know about the handler's signature.
struct Handler {
    /// Index of the `Json<T>` argument, if any.
    body: Option<usize>,
    /// Span of `T` in the body's `Json<T>`, for "not Serialize" errors on the whole body.
    body_span: Span,
}

impl Handler {
    fn inspect(func: &ItemFn, fields_key: Option<Span>) -> syn::Result<Handler> {
        let mut errors = Errors::default();
        let sig = &func.sig;
        if sig.asyncness.is_none() {
            errors.add(sig.fn_token.span, "#[idempotent] handlers must be `async fn`");
        }
        let mut body = None;
        let mut body_span = Span::call_site();
        for (index, input) in sig.inputs.iter().enumerate() {
            match input {
                FnArg::Receiver(receiver) => errors.add(
                    receiver.self_token.span,
                    "#[idempotent] handlers cannot take `self`; write a free `async fn` handler",
                ),
                FnArg::Typed(arg) => {
                    if let Some(inner) = json_inner(&arg.ty) {
                        if body.is_some() {
                            errors
                                .add(arg.ty.span(), "#[idempotent] handlers take at most one `Json<T>` body argument");
                        }
                        body = Some(index);
                        body_span = inner.span();
                    }
                }
            }
        }
        if let (Some(key), None) = (fields_key, body) {
            errors.add(
                key,
                format!(
                    "`fields` names fields of the JSON body, but `{}` has no `Json<T>` argument; \
                     remove `fields` or add the body argument",
                    sig.ident
                ),
            );
        }
        errors.finish(Handler { body, body_span })
    }
}

/// `T` when `ty` is `Json<T>` (any path ending in `Json` with one type argument).
fn json_inner(ty: &Type) -> Option<&Type> {
    match ty {
        Type::Group(group) => json_inner(&group.elem),
        Type::Paren(paren) => json_inner(&paren.elem),
        Type::Path(path) if path.qself.is_none() => {
            let last = path.path.segments.last()?;
            match &last.arguments {
                PathArguments::AngleBracketed(args) if last.ident == "Json" && args.args.len() == 1 => {
                    match &args.args[0] {
                        GenericArgument::Type(inner) => Some(inner),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Gives every token of `tokens` the span `span`.
///
/// A compiler error about an expression points at the expression's whole span; when its tokens
/// come from different places that span degrades to the whole attribute, so expressions whose
/// errors belong to the user's code are spanned there entirely.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let TokenTree::Group(group) = &token {
                let mut respanned = Group::new(group.delimiter(), respan(group.stream(), span));
                respanned.set_span(span);
                token = TokenTree::Group(respanned);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}

fn emit(framework: Framework, spec: &Spec, func: &ItemFn, handler: &Handler) -> TokenStream {
    let rt = framework.runtime();
    let name = &func.sig.ident;
    let ctx = format_ident!("__idempotent_ctx");

    let args: Vec<Ident> = (0..func.sig.inputs.len()).map(|i| format_ident!("__idempotent_arg{i}")).collect();
    let mut outer_inputs: Punctuated<FnArg, Token![,]> = Punctuated::new();
    for (index, (input, arg)) in func.sig.inputs.iter().zip(&args).enumerate() {
        if handler.body == Some(index) {
            outer_inputs.push(syn::parse_quote!(#ctx: #rt::Context));
        }
        if let FnArg::Typed(typed) = input {
            let ty = &typed.ty;
            outer_inputs.push(syn::parse_quote!(#arg: #ty));
        }
    }
    if handler.body.is_none() {
        outer_inputs.push(syn::parse_quote!(#ctx: #rt::Context));
    }

    let mut outer_sig = func.sig.clone();
    outer_sig.inputs = outer_inputs;
    outer_sig.output = syn::parse_quote!(-> #rt::Response);

    let mut inner = func.clone();
    inner.vis = Visibility::Inherited;
    inner.attrs.retain(is_lint_attr);
    // Documentation and any other attribute (framework routing macros included) stay on the
    // wrapper only, so they apply once, to the function the framework sees.
    let outer_attrs: Vec<&Attribute> = func.attrs.iter().collect();
    let vis = &func.vis;

    let policy = policy(&rt, spec);
    let fingerprint = fingerprint(&rt, spec, handler, &args);
    let record = record(framework, &rt, "protected", policy.clone(), spec.route.as_ref(), name);
    // Spanned at the user's return type, so "does not implement IntoResponse" or "is not Send"
    // points at the handler rather than at generated code.
    let output_span = match &func.sig.output {
        syn::ReturnType::Type(_, ty) => ty.span(),
        syn::ReturnType::Default => name.span(),
    };
    let run =
        respan(quote!(#rt::run(#ctx, &__IDEMPOTENT_POLICY, __idempotent_fp, #name(#(#args),*)).await), output_span);

    quote! {
        #(#outer_attrs)*
        #vis #outer_sig {
            #inner
            static __IDEMPOTENT_POLICY: #rt::Policy = #policy;
            let __idempotent_fp = #fingerprint;
            #run
        }
        #record
    }
}

/// Lint levels apply to the user's code, so the nested function keeps them.
fn is_lint_attr(attr: &Attribute) -> bool {
    ["allow", "warn", "deny", "forbid", "expect"].iter().any(|lint| attr.path().is_ident(lint))
}

fn duration(rt: &TokenStream, Millis(ms): Millis) -> TokenStream {
    if ms % 1000 == 0 {
        let secs = Literal::u64_unsuffixed(ms / 1000);
        quote!(#rt::Duration::from_secs(#secs))
    } else {
        let ms = Literal::u64_unsuffixed(ms);
        quote!(#rt::Duration::from_millis(#ms))
    }
}

fn field_names(spec: &Spec) -> Vec<LitStr> {
    let paths = spec.fields.iter().flat_map(|f| &f.paths);
    paths.map(|path| LitStr::new(&path.name(), path.segments[0].span())).collect()
}

fn policy(rt: &TokenStream, spec: &Spec) -> TokenStream {
    let scope = &spec.scope;
    let fields = field_names(spec);
    let ttl = duration(rt, spec.ttl);
    let lease = duration(rt, spec.lease);
    let wait_timeout = duration(rt, spec.wait_timeout);
    let key = match spec.key {
        KeyRequirement::Required => quote!(Required),
        KeyRequirement::Optional => quote!(Optional),
    };
    let on_conflict = match spec.on_conflict {
        ConflictMode::Reject => quote!(Reject),
        ConflictMode::Wait => quote!(Wait),
    };
    let outcomes = match spec.outcomes {
        StoredOutcomes::Final => quote!(Final),
        StoredOutcomes::Success => quote!(Success),
        StoredOutcomes::All => quote!(All),
    };
    let fail_open = spec.fail_open;
    quote! {
        #rt::Policy {
            scope: #scope,
            fields: &[#(#fields),*],
            ttl: #ttl,
            lease: #lease,
            key: #rt::KeyRequirement::#key,
            on_conflict: #rt::ConflictMode::#on_conflict,
            wait_timeout: #wait_timeout,
            outcomes: #rt::StoredOutcomes::#outcomes,
            fail_open: #fail_open,
        }
    }
}

/// The expression computing `Result<Fingerprint, FingerprintError>` from the arguments.
///
/// Each field access is spanned at the field's name in the attribute, so a field that does not
/// exist or is not `Serialize` is reported there.
fn fingerprint(rt: &TokenStream, spec: &Spec, handler: &Handler, args: &[Ident]) -> TokenStream {
    let scope = &spec.scope;
    let start = quote!(#rt::FingerprintBuilder::new(#scope));
    let Some(body) = handler.body.map(|index| &args[index]) else {
        return quote!(::core::result::Result::Ok(#start.finish()));
    };
    let paths: &[FieldPath] = spec.fields.as_ref().map_or(&[], |f| &f.paths);
    let names = field_names(spec);
    let mut calls = paths.iter().zip(&names).map(|(path, name)| {
        let span = path.segments[0].span();
        let segments = &path.segments;
        // The segments keep their own spans, so a missing `customer.email` is reported at `email`.
        let field = respan(quote!(field), span);
        let base = respan(quote!(&#body.0), span);
        quote!(.#field(#name, #base #(.#segments)*))
    });
    match calls.next() {
        None => {
            let call = respan(quote!(.body(&#body.0)), handler.body_span);
            quote!(#start #call .map(#rt::FingerprintBuilder::finish))
        }
        Some(first) => {
            let rest = calls.map(|call| quote!(.and_then(|__idempotent_b| __idempotent_b #call)));
            quote!(#start #first #(#rest)* .map(#rt::FingerprintBuilder::finish))
        }
    }
}

/// The registry record, built with `RouteRecord::protected(policy, ..)` or
/// `RouteRecord::exempted(reason, ..)` (`constructor` and `first`) so the record's other fields
/// keep their defaults.
fn record(
    framework: Framework,
    rt: &TokenStream,
    constructor: &str,
    first: TokenStream,
    route: Option<&Route>,
    name: &Ident,
) -> TokenStream {
    let constructor = format_ident!("{constructor}");
    let variant = framework.variant();
    let handler = format!("::{name}");
    let at = route.map(|Route { method, path }| quote!(.at(#method, #path)));
    // `line!()` is spanned at the attribute (the call site of this macro), the line the record
    // documents.
    quote! {
        #rt::inventory::submit! {
            #rt::RouteRecord::#constructor(
                #first,
                ::core::concat!(::core::module_path!(), #handler),
                ::core::file!(),
                ::core::line!(),
                #rt::Framework::#variant,
            )
            #at
        }
    }
}

/// Method and path from an actix-web routing attribute next to ours: `#[post("/path")]` (and the
/// other method macros) or `#[route("/path", method = "POST")]`. Only attributes below
/// `#[idempotent]` are visible here; the ones above it have already expanded.
pub(crate) fn actix_route(attrs: &[Attribute]) -> Option<Route> {
    const METHODS: [&str; 9] = ["get", "post", "put", "patch", "delete", "head", "options", "trace", "connect"];
    attrs.iter().find_map(|attr| {
        let ident = attr.path().segments.last()?.ident.to_string();
        let list = attr.meta.require_list().ok()?;
        let (path, rest) = list
            .parse_args_with(|input: syn::parse::ParseStream<'_>| {
                let path: LitStr = input.parse()?;
                let rest = if input.is_empty() {
                    Punctuated::new()
                } else {
                    input.parse::<Token![,]>()?;
                    Punctuated::<syn::MetaNameValue, Token![,]>::parse_terminated(input)?
                };
                Ok((path.value(), rest))
            })
            .ok()?;
        valid::check_path(&path).ok()?;
        let method = if METHODS.contains(&ident.as_str()) {
            ident.to_ascii_uppercase()
        } else if ident == "route" {
            rest.iter().find(|nv| nv.path.is_ident("method")).and_then(|nv| match &nv.value {
                syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) => Some(s.value().to_ascii_uppercase()),
                _ => None,
            })?
        } else {
            return None;
        };
        Some(Route { method, path })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(attr: &str, item: &str) -> String {
        idempotent(Framework::Axum, attr.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn context_goes_before_the_body() {
        let out = expand(
            r#"scope = "payments.create", fields = [amount]"#,
            "async fn h(c: Caller, Json(req): Json<Req>) -> u8 { 1 }",
        );
        let ctx = out.find("__idempotent_ctx :").unwrap();
        assert!(out.find("__idempotent_arg0 : Caller").unwrap() < ctx);
        assert!(ctx < out.find("__idempotent_arg1 : Json < Req >").unwrap());
        assert!(out.contains(". field (\"amount\" , & __idempotent_arg1 . 0 . amount)"), "{out}");
        assert!(out.contains("Duration :: from_secs (86400)"), "{out}");
    }

    #[test]
    fn context_is_last_without_a_body() {
        let out = expand(r#"scope = "a", lease = "1500ms""#, "async fn h(c: Caller) -> u8 { 1 }");
        assert!(out.contains("(__idempotent_arg0 : Caller , __idempotent_ctx :"), "{out}");
        assert!(out.contains("Duration :: from_millis (1500)"), "{out}");
        assert!(out.contains("Ok (:: idempotent_axum :: __private :: FingerprintBuilder :: new (\"a\") . finish ())"));
    }

    #[test]
    fn errors_keep_the_item() {
        let out = expand(r#"scope = "A""#, "async fn h() -> u8 { 1 }");
        assert!(out.starts_with("async fn h () -> u8 { 1 }"), "{out}");
        assert!(out.contains("compile_error"), "{out}");
        assert!(!out.contains("__idempotent"), "{out}");
    }

    #[test]
    fn exempt_handlers_are_left_as_written() {
        let out = expand(r#"exempt = "read-only", route = "POST /search""#, "fn search() -> u8 { 1 }");
        assert!(out.starts_with("fn search () -> u8 { 1 }"), "{out}");
        assert!(out.contains("RouteRecord :: exempted (\"read-only\""), "{out}");
        assert!(out.contains(". at (\"POST\" , \"/search\")"), "{out}");
        assert!(expand(r#"exempt = "read-only""#, "fn search() {}").contains("needs its method and path"));
    }

    #[test]
    fn reads_actix_routing_attributes() {
        let attrs = |s: &str| syn::parse_str::<ItemFn>(&format!("{s} async fn h() {{}}")).unwrap().attrs;
        let route = |method: &str, path: &str| Some(Route { method: method.into(), path: path.into() });
        assert_eq!(actix_route(&attrs(r#"#[post("/payments")]"#)), route("POST", "/payments"));
        assert_eq!(actix_route(&attrs(r#"#[doc = "x"] #[actix_web::put("/p/{id}")]"#)), route("PUT", "/p/{id}"));
        assert_eq!(actix_route(&attrs(r#"#[route("/p", method = "PATCH", method = "PUT")]"#)), route("PATCH", "/p"));
        assert_eq!(actix_route(&attrs(r#"#[delete("/p", wrap = "Logger")]"#)), route("DELETE", "/p"));
        assert_eq!(actix_route(&attrs("#[allow(unused)]")), None);
    }
}
