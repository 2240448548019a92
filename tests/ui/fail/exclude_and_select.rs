use idempotent_axum::idempotent;

#[idempotent(scope = "orders.cancel", fields = [path(id), query(page)], exclude = [path, query])]
async fn cancel(axum::extract::Path(id): axum::extract::Path<u64>) -> String {
    id.to_string()
}

fn main() {}
