use idempotent_axum::idempotent;

#[idempotent(scope = "orders.cancel", exclude = [headers, path, path])]
async fn cancel(axum::extract::Path(id): axum::extract::Path<u64>) -> String {
    id.to_string()
}

fn main() {}
