//! Rewrites an annotated handler and emits its registry record.
//!
//! The user's function is kept verbatim, nested inside a wrapper of the same name, so every type
//! error in it still points at the user's code. The wrapper takes the same arguments plus the
//! adapter's context extractor, fingerprints the body, and hands the inner call to the adapter's
//! `run`.

use crate::attr::{Args, FieldPath, TokenFrom};
use crate::duration::Millis;
use crate::valid::{self, ConflictMode, Errors, KeyRequirement, KeySource, Route, Spec, StoredOutcomes, Validated};
use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, FnArg, Ident, ItemFn, LitStr, Token, Type, Visibility};

/// The web framework a macro entry point serves, and where its runtime support lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framework {
    /// `idempotent-axum`.
    Axum,
    /// `idempotent-actix`.
    Actix,
    /// `idempotent-nats`: a message consumer's handler.
    Nats,
    /// `idempotent-rabbitmq`: a message consumer's handler.
    RabbitMq,
}

impl Framework {
    /// The hidden module of the adapter that generated code refers to.
    pub(crate) fn runtime(self) -> TokenStream {
        match self {
            Framework::Axum => quote!(::idempotent_axum::__private),
            Framework::Actix => quote!(::idempotent_actix::__private),
            Framework::Nats => quote!(::idempotent_nats::__private),
            Framework::RabbitMq => quote!(::idempotent_rabbitmq::__private),
        }
    }

    pub(crate) fn variant(self) -> Ident {
        match self {
            Framework::Axum => format_ident!("Axum"),
            Framework::Actix => format_ident!("Actix"),
            Framework::Nats => format_ident!("Nats"),
            Framework::RabbitMq => format_ident!("RabbitMq"),
        }
    }

    /// Whether its handlers consume a broker's messages (see `consumer`).
    pub(crate) fn is_consumer(self) -> bool {
        matches!(self, Framework::Nats | Framework::RabbitMq)
    }
}

/// Expands `#[idempotent(attr)] item`. On any error the item is emitted unchanged (less our own
/// `#[body]` marks) next to the errors, so the only messages the user sees are about the mistake
/// itself.
pub(crate) fn idempotent(framework: Framework, attr: TokenStream, item: TokenStream) -> TokenStream {
    match try_expand(framework, attr, item.clone()) {
        Ok(tokens) => tokens,
        Err(error) => {
            let errors = error.to_compile_error();
            let item = match syn::parse2::<ItemFn>(item.clone()) {
                Ok(mut func) => {
                    strip_body_marks(&mut func);
                    quote!(#func)
                }
                Err(_) => item,
            };
            quote!(#item #errors)
        }
    }
}

fn try_expand(framework: Framework, attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let validated = match syn::parse2::<Args>(attr) {
        Ok(args) if framework.is_consumer() => {
            let consumer = crate::consumer::check_args(&args).map_err(|e| errors.push(e));
            let validated = valid::validate(args).map_err(|e| errors.push(e)).ok();
            consumer.ok().and(validated)
        }
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
                let body_fields =
                    spec.fields.as_ref().filter(|f| !f.paths.is_empty()).map(|f| (f.key, "`fields` names"));
                let key_fields = match &spec.key_source {
                    KeySource::Fields(paths) => paths.first().map(|p| (p.segments[0].span(), "the key is read from")),
                    _ => None,
                };
                Handler::inspect(framework, func, body_fields.or(key_fields)).map_err(|e| errors.push(e)).ok()
            });
            let (Some(func), Some(handler)) = (func, handler) else {
                return errors.finish(TokenStream::new());
            };
            if spec.route.is_none() && framework == Framework::Actix {
                spec.route = actix_route(&func.attrs);
            }
            if framework.is_consumer() {
                return errors.finish(crate::consumer::emit(framework, &spec, &func, &handler));
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
            errors.finish(emit_exempt(framework, &exemption.reason, exemption.route.as_ref(), func))
        }
        None => errors.finish(TokenStream::new()),
    }
}

/// An exempt handler is left as written except for one extractor in front of its own, which
/// tells enforcement that this handler serves the route; its record is emitted next to it.
fn emit_exempt(framework: Framework, reason: &LitStr, route: Option<&Route>, mut func: ItemFn) -> TokenStream {
    let rt = framework.runtime();
    let record = record(framework, &rt, "exempted", quote!(#reason), route, &func.sig.ident);
    if func.sig.receiver().is_none() {
        func.sig.inputs.insert(0, syn::parse_quote!(_: #rt::Exempt));
    }
    quote!(#func #record)
}

/// What the expansion needs to know about the handler's signature.
pub(crate) struct Handler {
    /// The argument the declared body fields are read from: `#[body]`, else the one typed `Json`,
    /// `Form`, `Bytes` or `String`.
    pub(crate) body: Option<usize>,
    /// Whether the body is `Json<T>` or `Form<T>`, whose fields are reached through `.0` (so an
    /// unknown field is reported on `T`, not on the wrapper).
    pub(crate) wrapper: bool,
    /// The argument the adapter's `Protected` extractor wraps: on axum the last one (the only one
    /// allowed to read the body); on actix-web the body argument. `None`: an extra last argument.
    wrapped: Option<usize>,
}

/// Type names recognised as the body extractor when no argument is marked `#[body]`.
const BODY_TYPES: [&str; 5] = ["Json", "Form", "Bytes", "String", "Payload"];

impl Handler {
    fn inspect(framework: Framework, func: &ItemFn, body_fields: Option<(Span, &str)>) -> syn::Result<Handler> {
        let mut errors = Errors::default();
        let sig = &func.sig;
        // syn keeps function modifiers it may learn in later releases (e.g. `gen fn`) apart from
        // the signature; the wrapper only knows how to call a plain `async fn`, so any modifier is
        // reported where it is written. A parsed `ItemFn` has none today.
        if let Err(error) = func.modifiers.require_empty() {
            errors.push(error);
        }
        if sig.asyncness.is_none() {
            errors.add(sig.fn_token.span, "#[idempotent] handlers must be `async fn`");
        }
        let mut marked = None;
        let mut recognised = Vec::new();
        for (index, input) in sig.inputs.iter().enumerate() {
            match input {
                FnArg::Receiver(receiver) => errors.add(
                    receiver.self_token.span,
                    "#[idempotent] handlers cannot take `self`; write a free `async fn` handler",
                ),
                FnArg::Typed(arg) => {
                    if let Some(mark) = arg.attrs.iter().find(|a| a.path().is_ident("body")) {
                        if marked.is_some() {
                            errors.add(mark.span(), "only one argument can be marked `#[body]`");
                        }
                        marked = Some(index);
                    } else if type_name(&arg.ty).is_some_and(|name| BODY_TYPES.contains(&name.as_str())) {
                        recognised.push(index);
                    }
                }
            }
        }
        let body = match (marked, recognised.as_slice()) {
            (Some(index), _) => Some(index),
            (None, []) => None,
            (None, [index]) => Some(*index),
            (None, [.., index]) => {
                if body_fields.is_some() {
                    errors.add(
                        sig.inputs[*index].span(),
                        "more than one argument could be the body; mark the one `fields` are read from with `#[body]`",
                    );
                }
                Some(*index)
            }
        };
        let last = sig.inputs.len().checked_sub(1);
        let wrapped = match framework {
            Framework::Axum => {
                if let (Some(body), Some(last)) = (body, last) {
                    if body != last {
                        errors.add(
                            sig.inputs[body].span(),
                            "on axum the body extractor must be the handler's last argument",
                        );
                    }
                }
                last
            }
            Framework::Actix | Framework::Nats | Framework::RabbitMq => body,
        };
        if let (Some((span, what)), None) = (body_fields, body) {
            errors.add(
                span,
                format!(
                    "{what} fields of the request body, but `{}` has no body argument (`Json<T>`, `Form<T>`, \
                     or a custom extractor marked `#[body]`); remove the body fields or add the body argument",
                    sig.ident
                ),
            );
        }
        let wrapper = body.is_some_and(|index| match &sig.inputs[index] {
            FnArg::Typed(arg) => type_name(&arg.ty).is_some_and(|name| name == "Json" || name == "Form"),
            FnArg::Receiver(_) => false,
        });
        errors.finish(Handler { body, wrapper, wrapped })
    }
}

/// The last segment of a path type, through references, groups and parentheses.
fn type_name(ty: &Type) -> Option<String> {
    match ty {
        Type::Group(group) => type_name(&group.elem),
        Type::Paren(paren) => type_name(&paren.elem),
        Type::Reference(r) => type_name(&r.elem),
        Type::Path(path) if path.qself.is_none() => path.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

/// Removes our `#[body]` marks from the handler's arguments (they are not real attributes).
pub(crate) fn strip_body_marks(func: &mut ItemFn) {
    for input in &mut func.sig.inputs {
        if let FnArg::Typed(arg) = input {
            arg.attrs.retain(|a| !a.path().is_ident("body"));
        }
    }
}

/// Gives every token of `tokens` the span `span`.
///
/// A compiler error about an expression points at the expression's whole span; when its tokens
/// come from different places that span degrades to the whole attribute, so expressions whose
/// errors belong to the user's code are spanned there entirely.
pub(crate) fn respan(tokens: TokenStream, span: Span) -> TokenStream {
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
    let guarded = format_ident!("__idempotent_protected");

    let mut func = func.clone();
    strip_body_marks(&mut func);
    let args: Vec<Ident> = (0..func.sig.inputs.len()).map(|i| format_ident!("__idempotent_arg{i}")).collect();
    let mut outer_inputs: Punctuated<FnArg, Token![,]> = Punctuated::new();
    let mut unwrap = quote!(let (#ctx, ()) = #guarded.into_parts(););
    // The whole body is read up front when it is part of the identity, or holds the form token.
    let whole_body = (!spec.excluded.body && spec.fields.as_ref().is_none_or(|f| f.paths.is_empty()))
        || matches!(spec.key_source, KeySource::Issued { from: TokenFrom::Form(_), .. });
    for (index, (input, arg)) in func.sig.inputs.iter().zip(&args).enumerate() {
        if let FnArg::Typed(typed) = input {
            let ty = &typed.ty;
            if handler.wrapped == Some(index) {
                outer_inputs.push(syn::parse_quote!(#guarded: #rt::Protected<#ty, #whole_body>));
                unwrap = quote!(let (#ctx, #arg) = #guarded.into_parts(););
            } else {
                outer_inputs.push(syn::parse_quote!(#arg: #ty));
            }
        }
    }
    if handler.wrapped.is_none() {
        outer_inputs.push(syn::parse_quote!(#guarded: #rt::Protected<(), #whole_body>));
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
    let key_fields = key_fields(&rt, spec, handler, &args, &ctx);
    let fingerprint = fingerprint(&rt, spec, handler, &args, &ctx);
    let record = record(framework, &rt, "protected", policy.clone(), spec.route.as_ref(), name);
    let handler_path = format!("::{name}");
    // Spanned at the user's return type, so "does not implement IntoResponse" or "is not Send"
    // points at the handler rather than at generated code.
    let output_span = match &func.sig.output {
        syn::ReturnType::Type(_, ty) => ty.span(),
        syn::ReturnType::Default => name.span(),
    };
    let run = respan(
        quote!(#rt::run(#ctx, &__IDEMPOTENT_POLICY, &__IDEMPOTENT_SITE, __idempotent_fp, #name(#(#args),*)).await),
        output_span,
    );

    quote! {
        #(#outer_attrs)*
        #vis #outer_sig {
            #inner
            static __IDEMPOTENT_POLICY: #rt::Policy = #policy;
            static __IDEMPOTENT_SITE: #rt::Site = #rt::Site::new(::core::concat!(::core::module_path!(), #handler_path));
            #unwrap
            #key_fields
            let __idempotent_fp = #fingerprint;
            #run
        }
        #record
    }
}

/// Lint levels apply to the user's code, so the nested function keeps them.
pub(crate) fn is_lint_attr(attr: &Attribute) -> bool {
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

/// `Part::Omitted`, `Part::Only(&[names])` or `Part::Whole`.
fn part(rt: &TokenStream, excluded: bool, names: &[LitStr]) -> TokenStream {
    if excluded {
        quote!(#rt::Part::Omitted)
    } else if names.is_empty() {
        quote!(#rt::Part::Whole)
    } else {
        quote!(#rt::Part::Only(&[#(#names),*]))
    }
}

pub(crate) fn policy(rt: &TokenStream, spec: &Spec) -> TokenStream {
    let scope = &spec.scope;
    let names = |idents: Option<&Vec<Ident>>| -> Vec<LitStr> {
        idents.into_iter().flatten().map(|i| LitStr::new(&i.to_string(), i.span())).collect()
    };
    let path = part(rt, spec.excluded.path, &names(spec.fields.as_ref().map(|f| &f.path_params)));
    let query = part(rt, spec.excluded.query, &names(spec.fields.as_ref().map(|f| &f.query_params)));
    let body = part(rt, spec.excluded.body, &field_names(spec));
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
    let (fail_open, transactional) = (spec.fail_open, spec.transactional);
    let key_source = match &spec.key_source {
        KeySource::Header => quote!(#rt::KeySource::Header),
        KeySource::NamedHeader(name) => quote!(#rt::KeySource::NamedHeader(#name)),
        KeySource::Fields(paths) => {
            let names = paths.iter().map(|p| LitStr::new(&p.name(), p.segments[0].span()));
            quote!(#rt::KeySource::Fields(&[#(#names),*]))
        }
        KeySource::Derived => quote!(#rt::KeySource::Derived),
        KeySource::Issued { ttl, from } => {
            let ttl = duration(rt, *ttl);
            let from = match from {
                TokenFrom::Form(name) => quote!(#rt::TokenField::Form(#name)),
                TokenFrom::Header(name) => quote!(#rt::TokenField::Header(#name)),
            };
            quote!(#rt::KeySource::Issued { ttl: #ttl, from: #from })
        }
    };
    quote! {
        #rt::Policy {
            scope: #scope,
            identity: #rt::Identity { path: #path, query: #query, body: #body },
            ttl: #ttl,
            lease: #lease,
            key: #rt::KeyRequirement::#key,
            key_source: #key_source,
            on_conflict: #rt::ConflictMode::#on_conflict,
            wait_timeout: #wait_timeout,
            outcomes: #rt::StoredOutcomes::#outcomes,
            fail_open: #fail_open,
            transactional: #transactional,
        }
    }
}

/// The expression computing `Result<Fingerprint, FingerprintError>`: the context fingerprints
/// method, path, query and body as the policy says, and calls back for the declared body fields.
///
/// Each field access is spanned at the field's name in the attribute, so a field that does not
/// exist or is not `Serialize` is reported there. A field typed `HashSet`/`BTreeSet` is
/// fingerprinted as a set (elements sorted), whatever its iteration order.
pub(crate) fn fingerprint(
    rt: &TokenStream,
    spec: &Spec,
    handler: &Handler,
    args: &[Ident],
    ctx: &Ident,
) -> TokenStream {
    let paths: &[FieldPath] = spec.fields.as_ref().map_or(&[], |f| &f.paths);
    let (Some(body), false) = (handler.body.map(|index| &args[index]), paths.is_empty()) else {
        return quote!(#ctx.fingerprint(&__IDEMPOTENT_POLICY, ::core::result::Result::Ok));
    };
    let names = field_names(spec);
    let calls = paths.iter().zip(&names).map(|(path, name)| {
        let span = path.segments[0].span();
        let segments = &path.segments;
        // The segments keep their own spans, so a missing `customer.email` is reported at `email`.
        let access = if handler.wrapper { respan(quote!(&#body.0), span) } else { respan(quote!(&#body), span) };
        let wrapper = respan(quote!(#rt::Field), span);
        let add = respan(quote!(add_to), span);
        quote!(let __idempotent_b = (&#wrapper(#access #(.#segments)*)).#add(__idempotent_b, #name)?;)
    });
    quote! {
        #ctx.fingerprint(&__IDEMPOTENT_POLICY, |__idempotent_b| {
            #[allow(unused_imports)]
            use #rt::{PlainField as _, SetField as _};
            #(#calls)*
            ::core::result::Result::Ok(__idempotent_b)
        })
    }
}

/// For a key made of body fields, the statement that reads them into the context (each access
/// spanned at the field's name in the attribute, so a missing field or one that is not
/// `Serialize` is reported there); nothing otherwise.
pub(crate) fn key_fields(rt: &TokenStream, spec: &Spec, handler: &Handler, args: &[Ident], ctx: &Ident) -> TokenStream {
    let (KeySource::Fields(paths), Some(body)) = (&spec.key_source, handler.body.map(|index| &args[index])) else {
        return TokenStream::new();
    };
    let parts = paths.iter().map(|path| {
        let span = path.segments[0].span();
        let segments = &path.segments;
        let name = LitStr::new(&path.name(), span);
        let access = if handler.wrapper { respan(quote!(&#body.0), span) } else { respan(quote!(&#body), span) };
        let wrapper = respan(quote!(#rt::Field), span);
        let part = respan(quote!(key_part), span);
        quote!(let __idempotent_k = #wrapper(#access #(.#segments)*).#part(__idempotent_k, #name)?;)
    });
    quote! {
        let #ctx = #ctx.key_from_fields(|__idempotent_k| {
            #[allow(unused_imports)]
            use #rt::KeyField as _;
            #(#parts)*
            ::core::result::Result::Ok(__idempotent_k)
        });
    }
}

/// The registry record, built with `RouteRecord::protected(policy, ..)` or
/// `RouteRecord::exempted(reason, ..)` (`constructor` and `first`) so the record's other fields
/// keep their defaults.
pub(crate) fn record(
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
    fn axum_wraps_the_last_argument_and_reads_fields_through_it() {
        let out = expand(
            r#"scope = "payments.create", fields = [amount]"#,
            "async fn h(c: Caller, Json(req): Json<Req>) -> u8 { 1 }",
        );
        assert!(out.contains("__idempotent_arg0 : Caller , __idempotent_protected : :: idempotent_axum :: __private :: Protected < Json < Req > , false >"), "{out}");
        assert!(
            out.contains("let (__idempotent_ctx , __idempotent_arg1) = __idempotent_protected . into_parts ()"),
            "{out}"
        );
        assert!(out.contains("(& __idempotent_arg1 . 0 . amount)) . add_to (__idempotent_b , \"amount\")"), "{out}");
        assert!(out.contains("identity : :: idempotent_axum :: __private :: Identity { path : :: idempotent_axum :: __private :: Part :: Whole"), "{out}");
        assert!(out.contains("Duration :: from_secs (86400)"), "{out}");
    }

    #[test]
    fn a_handler_without_arguments_gets_a_protected_unit() {
        let out = expand(r#"scope = "a", lease = "1500ms""#, "async fn h() -> u8 { 1 }");
        assert!(
            out.contains("__idempotent_protected : :: idempotent_axum :: __private :: Protected < () , true >"),
            "{out}"
        );
        assert!(out.contains("let (__idempotent_ctx , ()) ="), "{out}");
        assert!(out.contains("Duration :: from_millis (1500)"), "{out}");
        assert!(
            out.contains("__idempotent_ctx . fingerprint (& __IDEMPOTENT_POLICY , :: core :: result :: Result :: Ok)"),
            "{out}"
        );
    }

    #[test]
    fn path_query_and_excluded_parts_reach_the_policy() {
        let out = expand(
            r#"scope = "a", fields = [path(id), query(page)], exclude = [body]"#,
            "async fn h(Path(id): Path<u64>) -> u8 { 1 }",
        );
        assert!(out.contains("path : :: idempotent_axum :: __private :: Part :: Only (& [\"id\"])"), "{out}");
        assert!(out.contains("query : :: idempotent_axum :: __private :: Part :: Only (& [\"page\"])"), "{out}");
        assert!(out.contains("body : :: idempotent_axum :: __private :: Part :: Omitted"), "{out}");
    }

    #[test]
    fn a_marked_body_is_used_and_the_mark_removed() {
        let out = idempotent(
            Framework::Actix,
            r#"scope = "a", fields = [amount]"#.parse().unwrap(),
            "async fn h(#[body] b: Validated<Req>, c: Caller) -> u8 { 1 }".parse().unwrap(),
        )
        .to_string();
        assert!(
            out.contains(
                "__idempotent_protected : :: idempotent_actix :: __private :: Protected < Validated < Req > , false >"
            ),
            "{out}"
        );
        assert!(!out.contains("# [body]"), "{out}");
    }

    #[test]
    fn errors_keep_the_item() {
        let out = expand(r#"scope = "A""#, "async fn h(#[body] b: B) -> u8 { 1 }");
        assert!(out.starts_with("async fn h (b : B) -> u8 { 1 }"), "{out}");
        assert!(out.contains("compile_error"), "{out}");
        assert!(!out.contains("__idempotent"), "{out}");
    }

    #[test]
    fn exempt_handlers_gain_only_the_marker_extractor() {
        let out = expand(r#"exempt = "read-only", route = "POST /search""#, "async fn search(q: Q) -> u8 { 1 }");
        assert!(
            out.starts_with("async fn search (_ : :: idempotent_axum :: __private :: Exempt , q : Q) -> u8 { 1 }"),
            "{out}"
        );
        assert!(out.contains("RouteRecord :: exempted (\"read-only\""), "{out}");
        assert!(out.contains(". at (\"POST\" , \"/search\")"), "{out}");
        assert!(!expand(r#"exempt = "read-only""#, "async fn search() {}").contains("compile_error"));
    }

    #[test]
    fn function_modifiers_are_rejected() {
        let mut func: ItemFn = syn::parse_str("async fn h() -> u8 { 1 }").unwrap();
        assert!(Handler::inspect(Framework::Axum, &func, None).is_ok());
        func.modifiers.defaultness = Some(Default::default());
        let error = Handler::inspect(Framework::Axum, &func, None).err().unwrap();
        assert_eq!(error.to_string(), "unexpected function modifier");
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
