//! The HTTP conformance suite against the actix-web demo on a loopback port.
//!
//! actix-web's server runs on its own system (a thread with a local task set), so it is started
//! on a dedicated thread that hands back the bound address.

use idempotent_tests::http::temp_ledger;
use payments_demo::config::Config;

async fn start_actix() -> Demo {
    let ledger = temp_ledger();
    let delay = Duration::from_millis(1200);
    let config = Config::new("memory", ledger.clone(), delay);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            match payments_demo::actix_app::start(&config).await {
                Ok((addr, server)) => {
                    let _ = tx.send(Ok(addr));
                    let _ = server.await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
    });
    let addr = rx.await.expect("demo thread").expect("demo starts");
    Demo::new(addr, ledger, delay)
}

idempotent_tests::http_conformance_tests!(start_actix());
