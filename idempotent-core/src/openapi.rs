//! OpenAPI documentation of protected operations, on a `utoipa` document (feature `utoipa`).
//!
//! [`document`] finds, for every protected route of the registry that knows its method and path,
//! the operation of the same method and path in the document, and adds:
//! - the `Idempotency-Key` header parameter, required or optional as the policy says, whose
//!   schema's pattern is exactly what the server accepts ([`HEADER_PATTERN`]);
//! - the problem responses (`application/problem+json`): 400 (key missing or malformed, body
//!   unreadable), 409 (the first request with the key is still running, with `Retry-After`; or its
//!   response was too large to store), 413 (body too large), 422 (the key was used with a different
//!   request), 500 (the request failed before completing, or its response failed after the
//!   operation ran), unless the route fails open 503 (the store is unreachable, with
//!   `Retry-After`), and on a transactional route of a runtime built to answer it 501
//!   (`WithoutTransactions::NotImplemented`: the store has no transactions). A status the
//!   operation already documents keeps its description and content, and gains the framework's
//!   meaning and the problem body beside them (a shared `$ref` response is left as it is). A 401
//!   for a missing caller identity depends on the application's actor source, so it is left to the
//!   application's own documentation;
//! - the `Idempotent-Replayed` response header on every documented response whose status the
//!   policy stores (so a replay can carry it).
//!
//! An operation is matched to a protected handler by the scope it names in the extension
//! [`SCOPE_EXTENSION`] (`x-idempotency-scope: payments.create`), by its `operationId` (utoipa's
//! default is the handler function's name, `create_payment`), or by method and path: the path
//! declared in the route attribute (an actix-web routing attribute, `route = ".."`) or any full
//! path the handler has served (nested routers and scopes included, see [`registry::served_at`]).
//! Exempt routes and operations the registry does not know are left untouched.
//!
//! Naming the scope is the way for a handler mounted at several paths (`/payments` and
//! `/v1/payments`): operation ids must be unique in a document, so only one of its operations can
//! carry the handler's name, and the full path of a nested router is known only once a request
//! has taken it, so a document built at start-up would miss it.
//!
//! ```
//! # use idempotent_core::{openapi, registry::{Framework, RouteRecord}, policy::Policy};
//! use utoipa::openapi::{path::{HttpMethod, OperationBuilder, PathItem}, OpenApiBuilder, PathsBuilder};
//!
//! const PAY: RouteRecord = RouteRecord::protected(Policy::new("payments.create"), "app::pay", "src/main.rs", 1,
//!     Framework::Axum).at("POST", "/payments");
//! let mut api = OpenApiBuilder::new()
//!     .paths(PathsBuilder::new().path("/payments", PathItem::new(HttpMethod::Post, OperationBuilder::new())))
//!     .build();
//! assert_eq!(openapi::document(&mut api, &[&PAY]), 1);
//! ```

use crate::engine::WithoutTransactions;
use crate::key::HEADER_PATTERN;
use crate::policy::{KeyRequirement, Policy};
use crate::problem::CONTENT_TYPE;
use crate::registry::{self, Framework, RouteRecord};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
pub use utoipa::openapi::OpenApi;
use utoipa::openapi::{RefOr, Required};

const RETRY_AFTER: &str = "Retry-After";

/// The header a replayed response carries.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// The operation extension naming the scope of the protected handler that serves an operation:
/// `x-idempotency-scope: payments.create` (see the module docs).
pub const SCOPE_EXTENSION: &str = "x-idempotency-scope";

/// Documents every protected operation of `routes` found in `openapi`, with the key header named
/// `Idempotency-Key`; returns how many operations were documented.
pub fn document(openapi: &mut OpenApi, routes: &[&RouteRecord]) -> usize {
    document_with_header(openapi, routes, "Idempotency-Key")
}

/// What an adapter's `Idempotency::document_openapi` does: documents the protected routes of
/// `framework` with the key header named as `runtime` reads it.
pub fn document_runtime(openapi: &mut OpenApi, runtime: &crate::engine::Runtime, framework: Framework) -> usize {
    let configured = &runtime.config().header_name;
    let header = if configured.eq_ignore_ascii_case("idempotency-key") { "Idempotency-Key" } else { configured };
    let without_transactions = runtime.config().without_transactions;
    document_all(openapi, &registry::routes_of(framework), header, without_transactions)
}

/// [`document`] with the key header named `header` (see the adapters' `header_name` setting).
pub fn document_with_header(openapi: &mut OpenApi, routes: &[&RouteRecord], header: &str) -> usize {
    document_all(openapi, routes, header, WithoutTransactions::default())
}

fn document_all(
    openapi: &mut OpenApi,
    routes: &[&RouteRecord],
    header: &str,
    without_transactions: WithoutTransactions,
) -> usize {
    let mut documented = 0;
    for r in routes {
        let (Some(policy), None) = (r.policy, r.exempt) else { continue };
        let name = r.handler.rsplit("::").next().unwrap_or(r.handler);
        let mut routes: Vec<String> = registry::served_at(r);
        routes.extend(r.route());
        for (path, item) in openapi.paths.paths.iter_mut() {
            for method in ["GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"] {
                let declared = routes
                    .iter()
                    .any(|route| route.strip_prefix(method).and_then(|p| p.strip_prefix(' ')) == Some(path));
                let Some(operation) = operation_mut(item, method) else { continue };
                if declared || operation.operation_id.as_deref() == Some(name) || names_scope(operation, policy.scope) {
                    document_operation(operation, &policy, header, without_transactions);
                    documented += 1;
                }
            }
        }
    }
    documented
}

/// Whether `operation` names `scope` in its [`SCOPE_EXTENSION`].
fn names_scope(operation: &Operation, scope: &str) -> bool {
    operation.extensions.as_ref().and_then(|e| e.get(SCOPE_EXTENSION)).and_then(|v| v.as_str()) == Some(scope)
}

fn operation_mut<'a>(item: &'a mut PathItem, method: &str) -> Option<&'a mut Operation> {
    match method.to_ascii_uppercase().as_str() {
        "GET" => item.get.as_mut(),
        "PUT" => item.put.as_mut(),
        "POST" => item.post.as_mut(),
        "DELETE" => item.delete.as_mut(),
        "OPTIONS" => item.options.as_mut(),
        "HEAD" => item.head.as_mut(),
        "PATCH" => item.patch.as_mut(),
        "TRACE" => item.trace.as_mut(),
        _ => None,
    }
}

fn document_operation(
    operation: &mut Operation,
    policy: &Policy,
    header: &str,
    without_transactions: WithoutTransactions,
) {
    // A key of the sender's own header is documented under that header's name; a key made of
    // body fields, or derived from the request, has no header to document.
    let header = match policy.key_source {
        crate::policy::KeySource::Header => header,
        crate::policy::KeySource::NamedHeader(name) => name,
        crate::policy::KeySource::Issued { from: crate::policy::TokenField::Header(name), .. } => name,
        crate::policy::KeySource::Fields(_)
        | crate::policy::KeySource::Derived
        | crate::policy::KeySource::Issued { from: crate::policy::TokenField::Form(_), .. } => "",
    };
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    let has_key = header.is_empty()
        || parameters.iter().any(|p| match p {
            RefOr::T(p) => p.parameter_in == ParameterIn::Header && p.name.eq_ignore_ascii_case(header),
            RefOr::Ref(_) => false,
        });
    if !has_key {
        let required = policy.key == KeyRequirement::Required;
        let description = if required {
            "Makes the request safe to retry: a retry with the same key replays the first response. Required."
        } else {
            "Makes the request safe to retry: a retry with the same key replays the first response. \
             Optional: without it the request runs unprotected."
        };
        parameters.push(
            ParameterBuilder::new()
                .name(header)
                .parameter_in(ParameterIn::Header)
                .required(if required { Required::True } else { Required::False })
                .description(Some(format!(
                    "{description} 1 to 255 visible ASCII characters: a token without commas, or an RFC 8941 \
                     string (which may hold spaces and commas)."
                )))
                .schema(Some(
                    ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).pattern(Some(HEADER_PATTERN)),
                ))
                .build()
                .into(),
        );
    }

    // The replay header on the responses a replay can repeat.
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else { continue };
        if stores(policy, status) && !response.headers.contains_key(REPLAYED_HEADER) {
            response.headers.insert(
                REPLAYED_HEADER.to_owned(),
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["true"]))))
                    .description(Some("`true` when this response is a replay of the first one with the same key."))
                    .build()
                    .into(),
            );
        }
    }

    let mut problems = vec![
        ("400", "The idempotency key is missing or malformed, or the request body could not be read.", false),
        (
            "409",
            "A request with the same idempotency key is still in progress (retry after `Retry-After`), or the \
             first one's response was too large to be stored.",
            true,
        ),
        ("413", "The request body is larger than this operation accepts; nothing was executed.", false),
        ("422", "The idempotency key was already used with a different request.", false),
        (
            "500",
            "The request failed before completing (retry with the same key), or the operation ran but its \
             response failed while being produced (a retry with the same key replays this answer).",
            false,
        ),
    ];
    if !policy.fail_open {
        problems.push(("503", "The idempotency store is unreachable; retry after `Retry-After`.", true));
    }
    if policy.transactional && without_transactions == WithoutTransactions::NotImplemented {
        problems.push((
            "501",
            "This operation runs in a transaction of the store's database, and this server's store has none; \
             nothing was executed.",
            false,
        ));
    }
    for (status, description, retry_after) in problems {
        match operation.responses.responses.get_mut(status) {
            None => {
                let response = problem_response(description, retry_after);
                operation.responses.responses.insert(status.to_owned(), RefOr::T(response));
            }
            Some(RefOr::T(response)) => also_answers(response, description, retry_after),
            // A shared response of the application's: changing it would change every operation using it.
            Some(RefOr::Ref(_)) => {}
        }
    }
}

/// Adds the framework's meaning of a status to a response the application documents: the
/// description says both, and the problem body and `Retry-After` are there beside the
/// application's own content.
fn also_answers(response: &mut utoipa::openapi::Response, description: &str, retry_after: bool) {
    if !response.description.contains(description) {
        response.description = format!("{} Also: {description}", response.description.trim_end());
    }
    if !response.content.contains_key(CONTENT_TYPE) {
        response.content.insert(CONTENT_TYPE.to_owned(), problem_content().into());
    }
    if retry_after && !response.headers.keys().any(|h| h.eq_ignore_ascii_case(RETRY_AFTER)) {
        response.headers.insert(RETRY_AFTER.to_owned(), retry_after_header());
    }
}

fn retry_after_header() -> RefOr<utoipa::openapi::header::Header> {
    let seconds = ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9]+$"));
    HeaderBuilder::new().schema(Some(seconds)).description(Some("Seconds to wait before retrying.")).build().into()
}

fn problem_content() -> utoipa::openapi::content::Content {
    let schema = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("type", ObjectBuilder::new().schema_type(Type::String))
        .property("title", ObjectBuilder::new().schema_type(Type::String))
        .property("status", ObjectBuilder::new().schema_type(Type::Integer))
        .property("detail", ObjectBuilder::new().schema_type(Type::String))
        .property("retry_after", ObjectBuilder::new().schema_type(Type::Integer))
        .required("type")
        .required("title")
        .required("status");
    ContentBuilder::new().schema(Some(schema)).build()
}

fn problem_response(description: &str, retry_after: bool) -> utoipa::openapi::Response {
    let mut response = ResponseBuilder::new()
        .description(format!("{description} RFC 9457 problem details."))
        .content(CONTENT_TYPE, problem_content())
        .build();
    if retry_after {
        response.headers.insert(RETRY_AFTER.to_owned(), retry_after_header());
    }
    response
}

/// Whether a documented response status (`201`, `2XX`, `default`) can be a stored outcome.
fn stores(policy: &Policy, status: &str) -> bool {
    if status == "default" {
        return true;
    }
    match status.parse::<u16>() {
        Ok(code) => policy.outcomes.stores(code),
        Err(_) => status.as_bytes().first().is_some_and(|d| policy.outcomes.stores(u16::from(d - b'0') * 100)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::StoredOutcomes;
    use crate::registry::Framework;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder};
    use utoipa::openapi::{OpenApiBuilder, PathsBuilder};

    const PAY: RouteRecord = RouteRecord::protected(
        Policy::new("payments.create"),
        "app::create_payment",
        "src/main.rs",
        1,
        Framework::Axum,
    )
    .at("POST", "/payments");
    const NOTE: RouteRecord = RouteRecord::protected(
        Policy {
            key: KeyRequirement::Optional,
            fail_open: true,
            outcomes: StoredOutcomes::Success,
            ..Policy::new("notes")
        },
        "app::patch_note",
        "src/main.rs",
        2,
        Framework::Axum,
    )
    .at("PATCH", "/notes/{id}");
    const SEARCH: RouteRecord =
        RouteRecord::exempted("read-only", "app::search", "src/main.rs", 3, Framework::Axum).at("POST", "/search");

    fn op(responses: &[&str]) -> OperationBuilder {
        let mut b = OperationBuilder::new();
        for status in responses {
            b = b.response(*status, ResponseBuilder::new().description("ok").build());
        }
        b
    }

    fn api() -> OpenApi {
        let mut payments = PathItem::new(HttpMethod::Post, op(&["201", "404"]));
        payments.get = Some(op(&["200"]).build());
        OpenApiBuilder::new()
            .paths(
                PathsBuilder::new()
                    .path("/payments", payments)
                    .path("/notes/{id}", PathItem::new(HttpMethod::Patch, op(&["2XX", "409", "default"])))
                    .path("/search", PathItem::new(HttpMethod::Post, op(&["200"]))),
            )
            .build()
    }

    fn json(api: &OpenApi) -> serde_json::Value {
        serde_json::to_value(api).unwrap()
    }

    #[test]
    fn documents_protected_operations() {
        let mut api = api();
        assert_eq!(document(&mut api, &[&PAY, &NOTE, &SEARCH]), 2);
        let v = json(&api);
        let post = &v["paths"]["/payments"]["post"];
        assert_eq!(post["parameters"][0]["name"], "Idempotency-Key");
        assert_eq!(post["parameters"][0]["in"], "header");
        assert_eq!(post["parameters"][0]["required"], true);
        // Exactly the values the server accepts: a generated "valid" key is never refused.
        assert_eq!(post["parameters"][0]["schema"]["pattern"], HEADER_PATTERN);
        assert!(
            post["parameters"][0]["schema"]["maxLength"].is_null(),
            "a quoted key is longer than its 255 characters"
        );
        for status in ["400", "409", "422", "503"] {
            let r = &post["responses"][status];
            assert!(r["content"]["application/problem+json"]["schema"]["properties"]["type"].is_object(), "{status}");
        }
        assert_eq!(post["responses"]["201"]["headers"]["Idempotent-Replayed"]["schema"]["enum"][0], "true");
        // 404 is a final outcome under the default policy: a replay can repeat it.
        assert!(post["responses"]["404"]["headers"]["Idempotent-Replayed"].is_object());
        // Other operations are untouched.
        assert!(v["paths"]["/payments"]["get"]["parameters"].is_null());
        assert!(v["paths"]["/search"]["post"]["parameters"].is_null());

        let patch = &v["paths"]["/notes/{id}"]["patch"];
        assert_eq!(patch["parameters"][0]["required"], false);
        let conflict = &patch["responses"]["409"];
        let description = conflict["description"].as_str().unwrap();
        assert!(description.starts_with("ok Also: A request with the same idempotency key"), "{description}");
        assert!(conflict["content"]["application/problem+json"]["schema"]["properties"]["type"].is_object());
        assert!(conflict["headers"]["Retry-After"].is_object());
        assert!(patch["responses"]["503"].is_null(), "fails open: no 503");
        assert!(patch["responses"]["2XX"]["headers"]["Idempotent-Replayed"].is_object());
        assert!(patch["responses"]["409"]["headers"]["Idempotent-Replayed"].is_null(), "success only");
    }

    /// One handler mounted at two paths: each operation has an id of its own, and neither path is
    /// declared nor served yet; both name the handler's scope.
    #[test]
    fn operations_naming_a_scope_are_documented() {
        let named = |id: &str, scope: &str| {
            let extensions = utoipa::openapi::extensions::ExtensionsBuilder::new().add(SCOPE_EXTENSION, scope).build();
            op(&["201"]).operation_id(Some(id)).extensions(Some(extensions))
        };
        const UNPLACED: RouteRecord = RouteRecord::protected(
            Policy::new("payments.create"),
            "app::create_payment",
            "src/main.rs",
            1,
            Framework::Axum,
        );
        let mut api = OpenApiBuilder::new()
            .paths(
                PathsBuilder::new()
                    .path("/payments", PathItem::new(HttpMethod::Post, named("pay", "payments.create")))
                    .path("/v1/payments", PathItem::new(HttpMethod::Post, named("v1_pay", "payments.create")))
                    .path("/refunds", PathItem::new(HttpMethod::Post, named("refund", "refunds.create"))),
            )
            .build();
        assert_eq!(document(&mut api, &[&UNPLACED]), 2);
        let v = json(&api);
        for path in ["/payments", "/v1/payments"] {
            assert_eq!(v["paths"][path]["post"]["parameters"][0]["name"], "Idempotency-Key", "{path}");
        }
        assert!(v["paths"]["/refunds"]["post"]["parameters"].is_null(), "another scope is left alone");
    }

    /// A 409 or 422 the application documents for its own reasons was left as it was, so the
    /// document never said that the framework answers it too (with a problem body).
    #[test]
    fn a_status_the_application_documents_also_gets_the_frameworks_meaning() {
        let mut api = api();
        let own = ResponseBuilder::new()
            .description("The amount is not positive.")
            .content("application/json", ContentBuilder::new().build())
            .build();
        api.paths
            .paths
            .get_mut("/payments")
            .unwrap()
            .post
            .as_mut()
            .unwrap()
            .responses
            .responses
            .insert("422".into(), own.into());
        document(&mut api, &[&PAY]);
        document(&mut api, &[&PAY]);
        let v = json(&api);
        let post = &v["paths"]["/payments"]["post"]["responses"];
        assert_eq!(
            post["422"]["description"],
            "The amount is not positive. Also: The idempotency key was already used with a different request.",
            "said once, however often the document is documented"
        );
        assert!(post["422"]["content"]["application/json"].is_object(), "the application's content is kept");
        assert!(post["422"]["content"]["application/problem+json"].is_object());
        for status in ["409", "503"] {
            assert_eq!(post[status]["headers"]["Retry-After"]["schema"]["pattern"], "^[0-9]+$", "{status}");
        }
        assert!(post["422"]["headers"]["Retry-After"].is_null());
    }

    /// POST /deposits on the memory store answered 501, which its document did not mention.
    #[test]
    fn a_transactional_route_documents_501_where_the_runtime_answers_it() {
        const DEPOSIT: RouteRecord = RouteRecord::protected(
            Policy { transactional: true, ..Policy::new("deposits.create") },
            "app::create_deposit",
            "src/main.rs",
            4,
            Framework::Axum,
        )
        .at("POST", "/payments");
        for (without, documented) in
            [(WithoutTransactions::NotImplemented, true), (WithoutTransactions::RefuseToStart, false)]
        {
            let mut api = api();
            document_all(&mut api, &[&DEPOSIT], "Idempotency-Key", without);
            let v = json(&api);
            let not_implemented = &v["paths"]["/payments"]["post"]["responses"]["501"];
            assert_eq!(not_implemented["content"]["application/problem+json"].is_object(), documented, "{without:?}");
        }
        let mut api = api();
        document_all(&mut api, &[&PAY], "Idempotency-Key", WithoutTransactions::NotImplemented);
        assert!(json(&api)["paths"]["/payments"]["post"]["responses"]["501"].is_null(), "not transactional");
    }

    #[test]
    fn is_idempotent_and_honours_the_header_name() {
        let mut api = api();
        document_with_header(&mut api, &[&PAY], "X-Request-Key");
        document_with_header(&mut api, &[&PAY], "x-request-key");
        let v = json(&api);
        let params = v["paths"]["/payments"]["post"]["parameters"].as_array().unwrap();
        assert_eq!(params.len(), 1);
        assert_eq!(params[0]["name"], "X-Request-Key");
    }
}
