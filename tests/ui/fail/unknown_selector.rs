use idempotent_axum::idempotent;

#[idempotent(scope = "orders.cancel", fields = [header(x_request)])]
async fn cancel() -> String {
    String::new()
}

fn main() {}
