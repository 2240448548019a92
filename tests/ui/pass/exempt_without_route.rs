//! An exempt axum handler needs no `route`: enforcement recognises it by its generated extractor.
use axum::Json;
use idempotent_axum::idempotent;
use serde_json::Value;

#[idempotent(exempt = "natural key: PUT replaces the resource")]
async fn put_profile(Json(profile): Json<Value>) -> Json<Value> {
    Json(profile)
}

fn main() {}
