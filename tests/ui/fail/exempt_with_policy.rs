use axum::Json;
use idempotent_axum::idempotent;
use serde_json::Value;

#[idempotent(exempt = "natural key", scope = "profiles.put", fields = [name], ttl = "1h", route = "PUT /profile")]
async fn put_profile(Json(profile): Json<Value>) -> Json<Value> {
    Json(profile)
}

fn main() {}
