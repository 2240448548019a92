//! `GET /openapi.json`: the OpenAPI 3.1 document of the demo, one description shared by both
//! binaries.
//!
//! [`document`] describes every route, framework-free: its parameters, request body schema with
//! its constraints, success responses, and the problems the demo's own code answers (401, 404, the
//! domain's 422, 501). Each binary then lets its idempotency runtime add what the protocol answers
//! on the protected operations (`Idempotency::document_openapi`: the key header, the 400, 409,
//! 413, 422, 500 and 503 problems, `Idempotent-Replayed`), and [`render`] turns the result into
//! the body it serves.
//!
//! # Adding a route
//! Add one [`Route`] to [`routes`], next to its neighbours:
//!
//! ```ignore
//! Route::post("/notifications", "send_notification", "Send a notification")
//!     .protected("notifications.send")            // the scope of its #[idempotent] handler
//!     .body::<SendNotification>()                  // a type deriving utoipa::ToSchema
//!     .created::<Notification>("The notification"),
//! ```
//!
//! and its body types to [`schemas`]. A route is authenticated by `Authorization: Bearer` unless
//! it is marked [`Route::public`]; a protected route names its scope, which is how the runtime
//! finds it, under every prefix it is mounted at. The tests check that every protected route of
//! the registry is in the document and that both binaries serve the same one.

use crate::deposits::{CreateDeposit, Deposit, Summary};
use crate::domain::{
    CreatePayment, CreateRefund, CreateTransfer, Notification, Payment, ProviderEvent, ProviderEventData, Refund,
    SendNotification, Transfer,
};
use serde_json::json;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ComponentsBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required};
use utoipa::ToSchema;

use idempotent_axum::core::key::HEADER_PATTERN;
pub use idempotent_axum::core::openapi::SCOPE_EXTENSION;

/// Media type of the document.
pub const CONTENT_TYPE: &str = "application/json";

/// Name of the bearer security scheme in the document.
const BEARER: &str = "bearer";

/// The schemas of the document's components: every request and response body.
pub fn schemas() -> ComponentsBuilder {
    ComponentsBuilder::new()
        .schema_from::<CreatePayment>()
        .schema_from::<Payment>()
        .schema_from::<CreateRefund>()
        .schema_from::<Refund>()
        .schema_from::<CreateTransfer>()
        .schema_from::<Transfer>()
        .schema_from::<CreateDeposit>()
        .schema_from::<Deposit>()
        .schema_from::<Summary>()
        .schema_from::<ProviderEvent>()
        .schema_from::<ProviderEventData>()
        .schema_from::<SendNotification>()
        .schema_from::<Notification>()
        .schema(
            "Received",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(
                    "received",
                    ObjectBuilder::new().schema_type(Type::String).description(Some("The delivery's `webhook-id`.")),
                )
                .required("received"),
        )
        .schema("QuoteRequest", ObjectBuilder::new().schema_type(Type::Object).description(Some("Any JSON object.")))
        .schema("Quote", quote())
        .schema("Record", record())
        .schema("Health", health())
        .schema("Problem", problem())
}

/// Every route of the demo, as the document describes it. The payment routes are served both at
/// the root and under `/v1`.
pub fn routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for (prefix, id) in [("", ""), ("/v1", "v1_")] {
        routes.extend([
            Route::post(format!("{prefix}/payments"), format!("{id}create_payment"), "Create a payment")
                .protected("payments.create")
                .body::<CreatePayment>()
                .created::<Payment>("The payment; its URL is in `Location`.")
                .location()
                .problem(422, "The amount is out of range or the currency is not three uppercase letters."),
            Route::get(format!("{prefix}/payments"), format!("{id}list_payments"), "The caller's payments")
                .ok_list::<Payment>("The caller's payments, oldest first."),
            Route::get(format!("{prefix}/payments/{{id}}"), format!("{id}get_payment"), "One of the caller's payments")
                .path_param("id", "The payment's id.")
                .ok::<Payment>("The payment.")
                .problem(404, "The caller has no payment with this id."),
            Route::post(format!("{prefix}/payments/{{id}}/refunds"), format!("{id}create_refund"), "Refund a payment")
                .protected("refunds.create")
                .path_param("id", "The refunded payment's id; part of the request's identity.")
                .body::<CreateRefund>()
                .created::<Refund>("The refund.")
                .problem(404, "The caller has no payment with this id (a final outcome, replayed like a refund).")
                .problem(
                    422,
                    "The amount is out of range (`urn:payments-demo:problem:validation`) or more than what is left \
                     to refund (`urn:payments-demo:problem:refund-exceeds-payment`); final outcomes, replayed.",
                ),
            Route::get(format!("{prefix}/payments/{{id}}/refunds"), format!("{id}list_refunds"), "A payment's refunds")
                .path_param("id", "The payment's id.")
                .ok_list::<Refund>("The payment's refunds, oldest first.")
                .problem(404, "The caller has no payment with this id."),
        ]);
    }
    routes.extend([
        Route::post("/transfers", "create_transfer", "Transfer between accounts")
            .protected("transfers.create")
            .body::<CreateTransfer>()
            .created::<Transfer>("The transfer, once processed.")
            .problem(422, "The amount is out of range."),
        Route::get("/transfers", "list_transfers", "The caller's transfers")
            .ok_list::<Transfer>("The caller's transfers, oldest first."),
        Route::post("/webhooks/provider", "receive_webhook", "Receive a provider's event")
            .public()
            .protected("webhooks.provider")
            .header_param("webhook-timestamp", "When the delivery was signed, in seconds since the Unix epoch; within five minutes of now.")
            .header_param("webhook-signature", "`v1,<base64 HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\">` (Standard Webhooks); several, space-separated, while the sender rotates its secret.")
            .body::<ProviderEvent>()
            .response(200, "The event was received: `{\"received\": <webhook-id>}`; a redelivery replays it.", json_content(schema_ref("Received")))
            .problem(401, "The delivery's signature does not verify, or its timestamp is more than five minutes off; nothing was executed."),
        Route::post("/notifications", "send_notification", "Send a notification")
            .protected("notifications.send")
            .body::<SendNotification>()
            .created::<Notification>("The notification; the same body from the same account within ten minutes replays it.")
            .problem(422, "No recipient or no text."),
        Route::post("/quotes", "create_quote", "Price a quote")
            .protected("quotes.create")
            .body_schema("QuoteRequest")
            .response(201, "The quote, with the request it prices.", json_content(schema_ref("Quote")))
            .problem(422, "The body is not a JSON object."),
        Route::post("/deposits", "create_deposit", "Deposit into the caller's balance")
            .protected("deposits.create")
            .body::<CreateDeposit>()
            .created::<Deposit>("The deposit and the balance after it.")
            .problem(422, "The amount is out of range."),
        Route::get("/deposits", "list_deposits", "The caller's deposits")
            .ok::<Summary>("How many deposits the caller made, and its balance.")
            .problem(501, "Deposits live in a SQL store's database; this server runs on another store."),
        Route::get("/_idempotency/records/{scope}/{key}", "record_status", "The caller's record of a key")
            .path_param("scope", "The route's scope, e.g. `payments.create`.")
            .path_param_schema("key", "The idempotency key.", idempotency_key())
            .ok_schema("The record.", schema_ref("Record"))
            .problem(400, "The key is not one a request could have sent.")
            .problem(404, "No record of the caller's under this scope and key: never used, expired, or released.")
            .problem(503, "The idempotency store does not answer; retry after `Retry-After`."),
        Route::get("/_idempotency/policies", "policy_report", "The idempotency policy of every route")
            .query_param(
                "format",
                "The report's format; JSON by default.",
                ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["json", "md", "html"])),
            )
            .response(
                200,
                "The report (its JSON schema is in `idempotent_core::report`).",
                [
                    ("application/json", ObjectBuilder::new().schema_type(Type::Object).into()),
                    ("text/markdown; charset=utf-8", string()),
                    ("text/html; charset=utf-8", string()),
                ],
            )
            .problem(400, "Unknown format."),
        Route::get("/metrics", "metrics", "Prometheus metrics").public().response(
            200,
            "The Prometheus text exposition format.",
            [(crate::metrics::CONTENT_TYPE, string())],
        ),
        Route::get("/healthz", "health", "Whether the idempotency store answers")
            .public()
            .ok_schema("The store answers.", schema_ref("Health"))
            .problem(503, "The idempotency store does not answer; retry after `Retry-After`."),
        Route::get("/openapi.json", "openapi", "This document").public().response(
            200,
            "The OpenAPI 3.1 document.",
            [(CONTENT_TYPE, ObjectBuilder::new().schema_type(Type::Object).into())],
        ),
    ]);
    routes
}

/// The methods the demo serves at the request path `path` (`/payments/pay_1` matches
/// `/payments/{id}`), uppercase and sorted; empty when no route has this path.
pub fn methods_at(path: &str) -> Vec<&'static str> {
    static TABLE: std::sync::OnceLock<Vec<(&'static str, Vec<String>)>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let segments = |p: &str| p.split('/').map(str::to_owned).collect();
        routes().iter().map(|r| (method_name(&r.method), segments(&r.path))).collect()
    });
    let segments: Vec<&str> = path.split('/').collect();
    let mut methods: Vec<&'static str> = table
        .iter()
        .filter(|(_, template)| {
            template.len() == segments.len()
                && template.iter().zip(&segments).all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
        })
        .map(|(method, _)| *method)
        .collect();
    methods.sort_unstable();
    methods.dedup();
    methods
}

fn method_name(method: &HttpMethod) -> &'static str {
    match method {
        HttpMethod::Get => "GET",
        HttpMethod::Post => "POST",
        HttpMethod::Put => "PUT",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Head => "HEAD",
        HttpMethod::Patch => "PATCH",
        HttpMethod::Trace => "TRACE",
    }
}

/// The document of [`routes`], without what the idempotency runtime adds (see [`render`]).
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for route in routes() {
        paths.add_path_operation(route.path, vec![route.method], route.operation);
    }
    let bearer = Http::builder()
        .scheme(HttpAuthScheme::Bearer)
        .description(Some(
            "The account is the caller's identity: `Authorization: Bearer <account>`, where account is 1 to 64 \
             letters, digits, `_` or `-`.",
        ))
        .build();
    let components = schemas().security_scheme(BEARER, SecurityScheme::Http(bearer)).build();
    OpenApiBuilder::new()
        .info(InfoBuilder::new().title("Payments demo").version(env!("CARGO_PKG_VERSION")).description(Some(
            "A small payments API whose mutating routes are safe to retry: send an `Idempotency-Key` \
                     and a retry gets the first response back (`Idempotent-Replayed: true`) instead of running \
                     the operation again. Every error is `application/problem+json` (RFC 9457).",
        )))
        .paths(paths)
        .components(Some(components))
        .security(Some([SecurityRequirement::new(BEARER, Vec::<String>::new())]))
        .build()
}

/// The body of `GET /openapi.json`: [`document`] with the protected operations documented by
/// `document_protected` (the binary's `Idempotency::document_openapi`).
///
/// Fails when the runtime documented fewer operations than the routes that name a scope: a
/// scope that no registered handler has (a typo, or a route whose handler lost its attribute).
pub fn render(document_protected: impl FnOnce(&mut OpenApi) -> usize) -> Result<String, String> {
    let mut document = document();
    let named = routes().iter().filter(|r| r.scope.is_some()).count();
    let documented = document_protected(&mut document);
    if documented < named {
        return Err(format!(
            "OpenAPI: {named} operations name a scope, but the idempotency runtime documented {documented}; \
             check the scopes in payments_demo::openapi::routes"
        ));
    }
    document.to_json().map_err(|e| format!("OpenAPI: cannot serialize the document: {e}"))
}

/// One route of the document: a method, a path and its operation, built with the methods below.
#[derive(Clone)]
pub struct Route {
    /// Its method.
    pub method: HttpMethod,
    /// Its path as the routers declare it (`/payments/{id}`).
    pub path: String,
    /// The scope of its `#[idempotent]` handler, if it is protected.
    pub scope: Option<&'static str>,
    /// Its operation.
    pub operation: Operation,
}

impl Route {
    fn new(method: HttpMethod, path: String, id: String, summary: &str) -> Self {
        let operation = OperationBuilder::new().operation_id(Some(id)).summary(Some(summary)).build();
        let unauthorized = problem_response("`Authorization: Bearer <account>` is missing or malformed.")
            .header("WWW-Authenticate", HeaderBuilder::new().schema(Some(string())).build());
        Self { method, path, scope: None, operation }.with_response(401, unauthorized)
    }

    /// A `GET` route with operation id `id`; authenticated, 401 documented.
    pub fn get(path: impl Into<String>, id: impl Into<String>, summary: &str) -> Self {
        Self::new(HttpMethod::Get, path.into(), id.into(), summary)
    }

    /// A `POST` route with operation id `id`; authenticated, 401 documented.
    pub fn post(path: impl Into<String>, id: impl Into<String>, summary: &str) -> Self {
        Self::new(HttpMethod::Post, path.into(), id.into(), summary)
    }

    /// Needs no authentication: no security requirement, no 401.
    pub fn public(mut self) -> Self {
        self.operation.responses.responses.remove("401");
        self.operation.security = Some(vec![SecurityRequirement::default()]);
        self
    }

    /// Served by the `#[idempotent]` handler of `scope`, which the runtime documents.
    pub fn protected(mut self, scope: &'static str) -> Self {
        self.scope = Some(scope);
        self.operation.extensions = Some(ExtensionsBuilder::new().add(SCOPE_EXTENSION, scope).build());
        self
    }

    /// A required path parameter, any string.
    pub fn path_param(self, name: &str, description: &str) -> Self {
        self.path_param_schema(name, description, string())
    }

    /// A required path parameter of `schema`.
    pub fn path_param_schema(self, name: &str, description: &str, schema: RefOr<Schema>) -> Self {
        self.parameter(
            ParameterBuilder::new().name(name).parameter_in(ParameterIn::Path).required(Required::True),
            description,
            schema,
        )
    }

    /// A required header parameter, any string.
    pub fn header_param(self, name: &str, description: &str) -> Self {
        self.parameter(
            ParameterBuilder::new().name(name).parameter_in(ParameterIn::Header).required(Required::True),
            description,
            string(),
        )
    }

    /// An optional query parameter.
    pub fn query_param(self, name: &str, description: &str, schema: impl Into<RefOr<Schema>>) -> Self {
        self.parameter(
            ParameterBuilder::new().name(name).parameter_in(ParameterIn::Query).required(Required::False),
            description,
            schema.into(),
        )
    }

    fn parameter(mut self, parameter: ParameterBuilder, description: &str, schema: RefOr<Schema>) -> Self {
        let parameter = parameter.description(Some(description)).schema(Some(schema)).build();
        self.operation.parameters.get_or_insert_with(Vec::new).push(RefOr::T(parameter));
        self
    }

    /// A required JSON request body of `T` (which [`schemas`] lists).
    pub fn body<T: ToSchema>(self) -> Self {
        self.body_schema(&T::name())
    }

    /// A required JSON request body of the component schema `name`, and the problems of a body
    /// the extractor refuses before anything runs.
    pub fn body_schema(mut self, name: &str) -> Self {
        let content = ContentBuilder::new().schema(Some(schema_ref(name))).build();
        let body = RequestBodyBuilder::new().required(Some(Required::True)).content("application/json", content);
        self.operation.request_body = Some(RefOr::T(body.build()));
        self.problem(400, "The body is not JSON; nothing was executed.")
            .problem(415, "The body is not declared `Content-Type: application/json`; nothing was executed.")
            .problem(
                422,
                "The body is JSON of another shape (a field missing or of another type); nothing was executed.",
            )
    }

    /// 201 with a JSON body of `T`.
    pub fn created<T: ToSchema>(self, description: &str) -> Self {
        self.response(201, description, json_content(schema_ref(&T::name())))
    }

    /// 200 with a JSON body of `T`.
    pub fn ok<T: ToSchema>(self, description: &str) -> Self {
        self.ok_schema(description, schema_ref(&T::name()))
    }

    /// 200 with a JSON array of `T`.
    pub fn ok_list<T: ToSchema>(self, description: &str) -> Self {
        self.ok_schema(description, ArrayBuilder::new().items(schema_ref(&T::name())).into())
    }

    /// 200 with a JSON body of `schema`.
    pub fn ok_schema(self, description: &str, schema: RefOr<Schema>) -> Self {
        self.response(200, description, json_content(schema))
    }

    /// A response of `status` with one body per content type.
    pub fn response<C: Into<String>>(
        self,
        status: u16,
        description: &str,
        contents: impl IntoIterator<Item = (C, RefOr<Schema>)>,
    ) -> Self {
        let mut response = ResponseBuilder::new().description(description);
        for (content_type, schema) in contents {
            response = response.content(content_type, ContentBuilder::new().schema(Some(schema)).build());
        }
        self.with_response(status, response)
    }

    /// A `Location` header on the 201.
    pub fn location(mut self) -> Self {
        if let Some(RefOr::T(created)) = self.operation.responses.responses.get_mut("201") {
            let header = HeaderBuilder::new().schema(Some(string())).description(Some("The created resource's path."));
            created.headers.insert("Location".into(), header.build().into());
        }
        self
    }

    /// A problem+json response of `status` that the demo's own code answers; a status already
    /// documented gains this description after its own.
    pub fn problem(mut self, status: u16, description: &str) -> Self {
        match self.operation.responses.responses.get_mut(&status.to_string()) {
            Some(RefOr::T(response)) => {
                response.description = format!("{} {description}", response.description);
                self
            }
            _ => self.with_response(status, problem_response(description)),
        }
    }

    fn with_response(mut self, status: u16, response: ResponseBuilder) -> Self {
        self.operation.responses.responses.insert(status.to_string(), RefOr::T(response.build()));
        self
    }
}

fn string() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).into()
}

fn schema_ref(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

fn json_content(schema: RefOr<Schema>) -> [(&'static str, RefOr<Schema>); 1] {
    [("application/json", schema)]
}

fn problem_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content(crate::api::PROBLEM_CONTENT_TYPE, ContentBuilder::new().schema(Some(schema_ref("Problem"))).build())
}

/// An idempotency key as a path segment: what the key header accepts (the path accepts commas too).
fn idempotency_key() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).pattern(Some(HEADER_PATTERN)).into()
}

fn problem() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("RFC 9457 problem details."))
        .property("type", ObjectBuilder::new().schema_type(Type::String).description(Some("Stable URI of the kind.")))
        .property("title", string())
        .property("status", ObjectBuilder::new().schema_type(Type::Integer))
        .property("detail", ObjectBuilder::new().schema_type(Type::String).description(Some("What to do next.")))
        .property(
            "retry_after",
            ObjectBuilder::new().schema_type(Type::Integer).description(Some("Seconds to wait before retrying.")),
        )
        .required("type")
        .required("title")
        .required("status")
}

fn quote() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("id", string())
        .property("price", ObjectBuilder::new().schema_type(Type::Integer))
        .property("request", schema_ref("QuoteRequest"))
        .required("id")
        .required("price")
        .required("request")
}

fn record() -> ObjectBuilder {
    let time = || ObjectBuilder::new().schema_type(Type::String).description(Some("RFC 3339, UTC."));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("scope", string())
        .property("key", string())
        .property(
            "state",
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["in_progress", "completed"])),
        )
        .property(
            "status",
            ObjectBuilder::new().schema_type(Type::Integer).description(Some("The stored response's status.")),
        )
        .property("created_at", time())
        .property("expires_at", time().description(Some("RFC 3339, UTC: the lease's deadline while in progress.")))
        .required("scope")
        .required("key")
        .required("state")
        .required("expires_at")
}

fn health() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("status", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["ok"])))
        .property("store", string())
        .required("status")
        .required("store")
        .examples([json!({"status": "ok", "store": "sqlite"})])
}

#[cfg(test)]
mod tests {
    use super::*;
    use idempotent_axum::core::registry::{routes_of, Framework};
    use std::collections::BTreeSet;

    /// A protected handler added to either binary without its route in the document fails here.
    /// The checkout's HTML form (a server-issued token as its key) is a browser page, not part of
    /// the JSON API this document describes.
    #[test]
    fn every_protected_route_of_both_binaries_is_documented() {
        use idempotent_axum::core::policy::KeySource;
        let documented: BTreeSet<&str> = routes().iter().filter_map(|r| r.scope).collect();
        let json_api = |r: &&&idempotent_axum::core::registry::RouteRecord| {
            !matches!(r.policy.as_ref().map(|p| p.key_source), Some(KeySource::Issued { .. }))
        };
        for framework in [Framework::Axum, Framework::Actix] {
            let registered: BTreeSet<&str> =
                routes_of(framework).iter().filter(json_api).filter_map(|r| r.scope()).collect();
            assert_eq!(documented, registered, "{framework:?}");
        }
    }

    #[test]
    fn operation_ids_are_unique_and_every_route_is_authenticated_or_public() {
        let routes = routes();
        let ids: BTreeSet<&str> = routes.iter().filter_map(|r| r.operation.operation_id.as_deref()).collect();
        assert_eq!(ids.len(), routes.len());
        for route in &routes {
            let public = route.operation.security.is_some();
            // A webhook is authenticated by its signature instead of a bearer token.
            let signed = route.path.starts_with("/webhooks/");
            assert_eq!(route.operation.responses.responses.contains_key("401"), !public || signed, "{}", route.path);
        }
    }

    /// Any string was documented, so a generated non-ASCII key was a "valid" request answered 400.
    #[test]
    fn the_status_endpoints_key_is_what_the_server_accepts() {
        let route = routes().into_iter().find(|r| r.path == "/_idempotency/records/{scope}/{key}").unwrap();
        let parameters = serde_json::to_value(&route.operation.parameters).unwrap();
        assert_eq!(parameters[1]["name"], "key");
        assert_eq!(parameters[1]["schema"]["pattern"], HEADER_PATTERN);
    }

    #[test]
    fn the_methods_at_a_path_come_from_the_routes_with_its_template() {
        assert_eq!(methods_at("/payments"), ["GET", "POST"]);
        assert_eq!(methods_at("/v1/payments/pay_1/refunds"), ["GET", "POST"]);
        assert_eq!(methods_at("/payments/pay_1"), ["GET"]);
        assert_eq!(methods_at("/_idempotency/records/payments.create/k"), ["GET"]);
        for unserved in ["/", "/payments/", "/payments//refunds", "/payments/pay_1/refunds/re_1", "/nothing"] {
            assert!(methods_at(unserved).is_empty(), "{unserved}");
        }
    }

    #[test]
    fn a_scope_no_handler_has_is_refused() {
        assert!(render(|_| 0).unwrap_err().contains("name a scope"));
        let json: serde_json::Value = serde_json::from_str(&render(|_| usize::MAX).unwrap()).unwrap();
        assert_eq!(json["paths"]["/v1/payments"]["post"][SCOPE_EXTENSION], "payments.create");
    }
}
