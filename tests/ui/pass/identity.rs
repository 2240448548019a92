//! The request's identity beyond JSON fields: path and query parameters in `fields`, parts left
//! out with `exclude`, `Form`, `Bytes` and `String` bodies, a custom body marked `#[body]`, and a
//! `HashSet` field.
use axum::extract::{Path, Query};
use axum::{body::Bytes, Form, Json};
use idempotent_axum::core::policy::Part;
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Deserialize, Serialize)]
struct Tags {
    tags: HashSet<String>,
    note: String,
}

#[derive(Deserialize)]
struct Page {
    page: u32,
}

#[idempotent(scope = "orders.cancel", fields = [path(id)], exclude = [body])]
async fn cancel(Path(id): Path<u64>) -> String {
    id.to_string()
}

#[idempotent(scope = "orders.search", fields = [query(page)])]
async fn search(Query(p): Query<Page>, body: String) -> String {
    format!("{} {body}", p.page)
}

#[idempotent(scope = "orders.tag", fields = [tags])]
async fn tag(Form(t): Form<Tags>) -> String {
    t.note
}

#[idempotent(scope = "orders.upload", exclude = [query])]
async fn upload(body: Bytes) -> String {
    body.len().to_string()
}

/// A custom body extractor: `#[body]` says where `fields` are read from.
struct Checked<T>(T);

impl<T> std::ops::Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Checked<T> {
    type Rejection = axum::response::Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::response::IntoResponse;
        let Json(v) = Json::<T>::from_request(req, state).await.map_err(IntoResponse::into_response)?;
        Ok(Checked(v))
    }
}

#[idempotent(scope = "orders.note", fields = [note, tags])]
async fn note(#[body] t: Checked<Tags>) -> String {
    t.note.clone()
}

fn main() {
    use axum::routing::post;
    let _app: axum::Router = axum::Router::new()
        .route("/orders/{id}/cancel", post(cancel))
        .route("/orders/search", post(search))
        .route("/orders/tag", post(tag))
        .route("/orders/upload", post(upload))
        .route("/orders/note", post(note));
    let routes = idempotent_axum::core::registry::routes();
    let policy = |scope: &str| routes.iter().find(|r| r.scope() == Some(scope)).unwrap().policy.unwrap();
    assert_eq!(policy("orders.cancel").identity.path, Part::Only(&["id"]));
    assert_eq!(policy("orders.cancel").identity.body, Part::Omitted);
    assert_eq!(policy("orders.search").identity.query, Part::Only(&["page"]));
    assert_eq!(policy("orders.search").identity.body, Part::Whole);
    assert_eq!(policy("orders.tag").identity.body, Part::Only(&["tags"]));
    assert_eq!(policy("orders.upload").identity.query, Part::Omitted);
    assert_eq!(policy("orders.note").fields(), ["note", "tags"]);
}
