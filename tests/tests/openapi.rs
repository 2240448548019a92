//! `Idempotency::document_openapi` on both adapters: protected operations are found by their
//! operation id (utoipa's default is the handler's name) or by a path they declare, and gain the
//! key header and the problem responses; other operations are left as they are.

use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::core::utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterIn, PathItem};
use idempotent_axum::core::utoipa::openapi::{OpenApi, OpenApiBuilder, PathsBuilder, RefOr, ResponseBuilder};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Only ever deserialized by the handlers, which this test documents but never calls.
#[allow(dead_code)]
#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

#[idempotent_axum::idempotent(scope = "openapi.axum.orders.create", fields = [amount])]
async fn create_order_axum(axum::Json(order): axum::Json<Order>) -> String {
    order.amount.to_string()
}

#[idempotent_actix::idempotent(scope = "openapi.actix.orders.create", fields = [amount])]
#[actix_web::post("/orders")]
async fn create_order_actix(order: actix_web::web::Json<Order>) -> String {
    order.amount.to_string()
}

fn document(operation_id: &str, path: &str) -> OpenApi {
    let operation = |id: &str| {
        OperationBuilder::new()
            .operation_id(Some(id.to_owned()))
            .response("201", ResponseBuilder::new().description("created"))
            .build()
    };
    let mut paths = PathsBuilder::new()
        .path(path, PathItem::new(HttpMethod::Post, operation(operation_id)))
        .path("/unrelated", PathItem::new(HttpMethod::Post, operation("unrelated")));
    paths = paths.path("/list", PathItem::new(HttpMethod::Get, operation("list")));
    OpenApiBuilder::new().paths(paths).build()
}

fn has_key_header(api: &OpenApi, path: &str) -> bool {
    let op = api.paths.paths[path].post.as_ref().unwrap();
    op.parameters.iter().flatten().any(|p| match p {
        RefOr::T(p) => p.parameter_in == ParameterIn::Header && p.name == "Idempotency-Key",
        RefOr::Ref(_) => false,
    })
}

#[test]
fn axum_documents_a_nested_operation_found_by_its_operation_id() {
    let idempotency = idempotent_axum::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .build()
        .unwrap();
    let mut api = document("create_order_axum", "/v1/orders");
    assert_eq!(idempotency.document_openapi(&mut api), 1);
    assert!(has_key_header(&api, "/v1/orders"));
    let responses = &api.paths.paths["/v1/orders"].post.as_ref().unwrap().responses.responses;
    for status in ["400", "409", "413", "422", "500", "503"] {
        assert!(responses.contains_key(status), "{status}");
    }
    assert!(!has_key_header(&api, "/unrelated"));
}

#[test]
fn actix_documents_an_operation_by_the_path_of_its_routing_attribute() {
    let idempotency = idempotent_actix::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .build()
        .unwrap();
    let mut api = document("no_such_handler", "/orders");
    assert_eq!(idempotency.document_openapi(&mut api), 1);
    assert!(has_key_header(&api, "/orders"));
    assert!(!has_key_header(&api, "/unrelated"));
}
