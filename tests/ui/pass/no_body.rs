//! A handler without a body: the fingerprint is the scope alone.
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use idempotent_axum::idempotent;

#[idempotent(scope = "invoices.send")]
async fn send_invoice(Path(id): Path<u64>) -> (StatusCode, String) {
    (StatusCode::ACCEPTED, format!("sending {id}"))
}

#[idempotent(scope = "jobs.run")]
async fn run_job() -> &'static str {
    "started"
}

fn main() {
    let _app: Router = Router::new().route("/p/{id}", post(send_invoice)).route("/j", post(run_job));
}
