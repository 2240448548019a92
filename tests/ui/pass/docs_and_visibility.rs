//! The wrapper keeps the handler's visibility and doc comments, and generates no warnings.
#![deny(warnings, missing_docs)]

mod handlers {
    use axum::Json;
    use idempotent_axum::idempotent;
    use serde::{Deserialize, Serialize};

    /// A transfer between two accounts.
    #[derive(Deserialize, Serialize)]
    pub struct Transfer {
        /// Debited account.
        pub from: String,
        /// Credited account.
        pub to: String,
        /// Amount in cents.
        pub cents: i64,
    }

    /// Moves money; runs once per key.
    #[idempotent(scope = "transfers.create", fields = [from, to, cents], lease = "30s")]
    #[allow(clippy::needless_pass_by_value)]
    pub async fn transfer(Json(t): Json<Transfer>) -> String {
        format!("{} -> {}: {}", t.from, t.to, t.cents)
    }
}

fn main() {
    let _app: axum::Router = axum::Router::new().route("/p", axum::routing::post(handlers::transfer));
}
