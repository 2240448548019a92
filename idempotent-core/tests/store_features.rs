//! A store specification whose store is not built in is a configuration error that names the
//! cargo feature to enable, before anything is connected.

use idempotent_core::store::{self, StoreError};

/// `mysql://` and `mariadb://` without the `mysql` feature.
#[cfg(not(feature = "mysql"))]
#[tokio::test]
async fn mysql_urls_need_the_mysql_feature() {
    for spec in ["mysql://app@127.0.0.1:1/app", "mariadb://app@127.0.0.1:1/app"] {
        match store::connect(spec).await {
            Err(StoreError::Config(msg)) => assert!(msg.contains("`mysql` cargo feature"), "{spec}: {msg}"),
            Err(e) => panic!("{spec}: {e:?}"),
            Ok(_) => panic!("{spec}: connected"),
        }
    }
}

/// With the feature, `mariadb://` reaches the MySQL store (here: nothing listens; `mysql://` is
/// tested against a real server in `tests/tests/store_mysql.rs`).
#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_urls_reach_the_mysql_store() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = format!("mariadb://app@127.0.0.1:{port}/app");
    match store::connect(&spec).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.starts_with("MySQL: "), "{spec}: {msg}"),
        Err(e) => panic!("{spec}: {e:?}"),
        Ok(_) => panic!("{spec}: connected"),
    }
}
