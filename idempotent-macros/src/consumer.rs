//! The attribute on a message consumer's handler: what it accepts beyond a route's checks, and
//! the handler value it expands to.
//!
//! A consumer handler is not called by a web framework but by its broker crate's runner, which
//! needs its policy as well as a way to call it. So the function becomes a constant of the
//! runner's `Handler` type, of the same name: the user's function, kept verbatim inside it (type
//! errors still point at the user's code), and a plain function that takes each argument from
//! the delivery (`FromDelivery`), reads the key, fingerprints the message and runs the protocol.

use crate::attr::{Args, KeyArg};
use crate::expand::{
    fingerprint, is_lint_attr, key_fields, policy, record, respan, strip_body_marks, Framework, Handler,
};
use crate::valid::{Errors, Spec};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, Visibility};

/// The arguments a consumer handler cannot take, and the key it must name.
pub(crate) fn check_args(args: &Args) -> syn::Result<()> {
    let mut errors = Errors::default();
    let not_here = [
        ("route", args.route.as_ref().map(|a| a.key), "a consumer's stream and subject are its runner's"),
        (
            "on_conflict",
            args.on_conflict.as_ref().map(|a| a.key),
            "a message in progress elsewhere is redelivered later",
        ),
        (
            "wait_timeout",
            args.wait_timeout.as_ref().map(|a| a.key),
            "a message in progress elsewhere is redelivered later",
        ),
        ("exempt", args.exempt.as_ref().map(|a| a.key), "a consumer that needs no protection is not annotated"),
    ];
    for (name, span, why) in not_here {
        if let Some(span) = span {
            errors.add(span, format!("`{name}` does not apply to a consumer handler ({why}); remove it"));
        }
    }
    if let Some(fields) = &args.fields {
        for param in fields.path_params.iter().chain(&fields.query_params) {
            errors.add(param.span(), "a message has no path or query parameters; `fields` lists body fields here");
        }
    }
    const KEY: &str = "a consumer handler names where its key comes from: `key = header(\"Nats-Msg-Id\")`, \
                       `key = field(id)`, `key = [field(type), field(id)]` or `key = derived`";
    match &args.key {
        None if args.exempt.is_none() => errors.add(Span::call_site(), KEY),
        Some(KeyArg::Requirement(arg)) => errors.add(arg.value.span(), KEY),
        _ => {}
    }
    errors.finish(())
}

/// `#vis const name: Handler = { the user's fn; the delivery's fn; Handler { .. } };` and the
/// registry record.
pub(crate) fn emit(framework: Framework, spec: &Spec, func: &ItemFn, handler: &Handler) -> TokenStream {
    let rt = framework.runtime();
    let name = &func.sig.ident;
    let ctx = format_ident!("__idempotent_ctx");
    let mut func = func.clone();
    strip_body_marks(&mut func);
    let args: Vec<Ident> = (0..func.sig.inputs.len()).map(|i| format_ident!("__idempotent_arg{i}")).collect();
    let takes = func.sig.inputs.iter().zip(&args).filter_map(|(input, arg)| {
        let FnArg::Typed(typed) = input else { return None };
        let ty = &typed.ty;
        // Spanned at the argument's type: "does not implement FromDelivery" lands there.
        let from = respan(quote!(<#ty as #rt::FromDelivery>::from_delivery), ty.span());
        Some(quote! {
            let #arg = match #from(&#ctx) {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(rejection) => return #ctx.rejected(&__IDEMPOTENT_POLICY, rejection),
            };
        })
    });
    let takes: Vec<TokenStream> = takes.collect();
    let mut inner = func.clone();
    inner.vis = Visibility::Inherited;
    inner.attrs.retain(is_lint_attr);
    let docs = func.attrs.iter().filter(|a| a.path().is_ident("doc"));
    let vis = &func.vis;
    let policy = policy(&rt, spec);
    let key_fields = key_fields(&rt, spec, handler, &args, &ctx);
    let fingerprint = fingerprint(&rt, spec, handler, &args, &ctx);
    let record = record(framework, &rt, "protected", policy.clone(), None, name);
    let handler_path = format!("::{name}");
    let variant = framework.variant();
    let output_span = match &func.sig.output {
        syn::ReturnType::Type(_, ty) => ty.span(),
        syn::ReturnType::Default => name.span(),
    };
    let run = respan(
        quote!(#ctx.run(#rt::Framework::#variant, &__IDEMPOTENT_POLICY, __idempotent_fp, #name(#(#args),*)).await),
        output_span,
    );
    quote! {
        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #name: #rt::Handler = {
            #inner
            static __IDEMPOTENT_POLICY: #rt::Policy = #policy;
            fn __idempotent_call(#ctx: #rt::Delivery) -> #rt::Settling {
                ::std::boxed::Box::pin(async move {
                    #(#takes)*
                    #key_fields
                    let __idempotent_fp = #fingerprint;
                    #run
                })
            }
            #rt::Handler {
                policy: &__IDEMPOTENT_POLICY,
                handler: ::core::concat!(::core::module_path!(), #handler_path),
                call: __idempotent_call,
            }
        };
        #record
    }
}

#[cfg(test)]
mod tests {
    fn expand(attr: &str, item: &str) -> String {
        crate::expand::idempotent(crate::expand::Framework::Nats, attr.parse().unwrap(), item.parse().unwrap())
            .to_string()
    }

    #[test]
    fn a_consumer_handler_becomes_a_handler_constant() {
        let out = expand(
            r#"scope = "settlements.create", key = field(payment), fields = [payment, amount], ttl = "7d""#,
            "pub async fn settle(msg: Json<Settle>) -> Result<(), ConsumeError> { Ok(()) }",
        );
        assert!(out.contains("pub const settle : :: idempotent_nats :: __private :: Handler"), "{out}");
        assert!(
            out.contains("< Json < Settle > as :: idempotent_nats :: __private :: FromDelivery > :: from_delivery"),
            "{out}"
        );
        assert!(out.contains("KeySource :: Fields (& [\"payment\"])"), "{out}");
        assert!(out.contains("Framework :: Nats"), "{out}");
    }

    #[test]
    fn a_rabbitmq_handler_refers_to_its_own_crate() {
        let out = crate::expand::idempotent(
            crate::expand::Framework::RabbitMq,
            r#"scope = "s", key = header("message-id")"#.parse().unwrap(),
            "async fn h(m: Bytes) -> Result<(), ConsumeError> { Ok(()) }".parse().unwrap(),
        )
        .to_string();
        assert!(out.contains(":: idempotent_rabbitmq :: __private :: Handler"), "{out}");
        assert!(out.contains("Framework :: RabbitMq"), "{out}");
        assert!(!out.contains("idempotent_nats"), "{out}");
    }

    #[test]
    fn consumer_only_errors() {
        let out = expand(r#"scope = "a""#, "async fn h(m: Bytes) -> Result<(), E> { Ok(()) }");
        assert!(out.contains("a consumer handler names where its key comes from"), "{out}");
        let out =
            expand(r#"scope = "a", key = derived, route = "POST /x""#, "async fn h() -> Result<(), E> { Ok(()) }");
        assert!(out.contains("`route` does not apply to a consumer handler"), "{out}");
    }
}
