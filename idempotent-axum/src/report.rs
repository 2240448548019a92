//! Serving the policy report and rendering problems.

use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use idempotent_core::problem::Problem;
use idempotent_core::registry;
use idempotent_core::report::{render, Format};
use std::collections::HashMap;

/// Handler serving the policy report of every route registered through this adapter:
/// `.route("/_idempotency/policies", get(policy_report))`. `?format=json` (default), `md` or
/// `html`; an unknown format is 400.
pub async fn policy_report(Query(query): Query<HashMap<String, String>>) -> Response {
    let format = match query.get("format").map(String::as_str).unwrap_or("json").parse::<Format>() {
        Ok(f) => f,
        Err(e) => return (http::StatusCode::BAD_REQUEST, e).into_response(),
    };
    let body = render(&registry::routes_of(registry::Framework::Axum), format);
    ([(http::header::CONTENT_TYPE, format.content_type())], body).into_response()
}

/// Renders a [`Problem`] as an `application/problem+json` response, for applications that want
/// their own errors to look like the framework's.
pub fn render_problem(problem: &Problem) -> Response {
    crate::capture::problem_response(problem)
}
