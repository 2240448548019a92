//! Serving the policy report and rendering problems.

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use idempotent_core::problem::Problem;
use idempotent_core::registry::{self, Framework};
use idempotent_core::report::{render, Format};
use std::collections::HashMap;

/// Handler serving the policy report of every route registered through this adapter:
/// `.route("/_idempotency/policies", web::get().to(policy_report))`. `?format=json` (default),
/// `md` or `html`; an unknown format is 400.
pub async fn policy_report(query: web::Query<HashMap<String, String>>) -> HttpResponse {
    let format = match query.get("format").map(String::as_str).unwrap_or("json").parse::<Format>() {
        Ok(f) => f,
        Err(e) => {
            return HttpResponse::BadRequest()
                .insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"))
                .body(e)
        }
    };
    let body = render(&registry::routes_of(Framework::Actix), format);
    HttpResponse::Ok().insert_header((header::CONTENT_TYPE, format.content_type())).body(body)
}

/// Renders a [`Problem`] as an `application/problem+json` response, for applications that want
/// their own errors to look like the framework's.
pub fn render_problem(problem: &Problem) -> HttpResponse {
    crate::capture::problem_response(problem)
}
