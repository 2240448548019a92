//! A real browser for the tests: headless Chromium from Debian's packages, driven over WebDriver
//! by chromedriver (the `chromium` and `chromium-driver` packages), from Rust with `fantoccini`.
//!
//! Why WebDriver and fantoccini: chromedriver is packaged by Debian next to the browser, at the
//! same version, so nothing is downloaded at run time; WebDriver's element clicks, history and
//! screenshots are the operations a user's form submit needs, and fantoccini is the maintained
//! async (tokio) WebDriver client, small, with no TLS needed to talk to a local driver (built
//! with its default TLS features off). A CDP client (chromiumoxide) would pin a protocol version
//! to the browser's, and thirtyfour is a larger layer over the same WebDriver calls.
//!
//! [`Browser::start`] finds `chromedriver` and `chromium` on PATH, installs the two packages with
//! apt-get when they are missing and the tests run as root, starts chromedriver on a free port and
//! opens a headless session. When no browser can be had it prints a loud `SKIPPED` line and
//! answers `None`, and under `CI=true` it panics instead: a missing browser is a failure there.

use fantoccini::{Client, ClientBuilder};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A headless Chromium session and the chromedriver serving it; both end when it is dropped.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").field("driver", &self.driver.id()).finish()
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| PathBuf::from(dir).join(name)).find(|p| p.is_file())
}

/// `chromedriver` and the browser binary, installing Debian's packages when they are missing.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    let found = || Some((on_path("chromedriver")?, on_path("chromium").or_else(|| on_path("chromium-browser"))?));
    if let Some(found) = found() {
        return Some(found);
    }
    let root = Command::new("id").arg("-u").output().ok().is_some_and(|o| o.stdout.trim_ascii() == b"0");
    if root && on_path("apt-get").is_some() {
        eprintln!("browser: installing chromium and chromium-driver");
        let apt = |args: &[&str]| {
            Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null()).status()
        };
        let _ = apt(&["update", "-qq"]);
        let _ = apt(&["install", "-y", "-qq", "chromium", "chromium-driver"]);
    }
    found()
}

fn skip(why: &str) -> Option<Browser> {
    let message = format!(
        "SKIPPED: no browser ({why}): install Debian's `chromium` and `chromium-driver` (scripts/services.sh does)"
    );
    if crate::redis_server::in_ci() {
        panic!("{message} (a missing browser is a failure under CI=true)");
    }
    eprintln!("\n==================== {message} ====================\n");
    None
}

impl Browser {
    /// A fresh headless session with a 1024×900 window, or `None` (loudly) when there is no
    /// browser; panics under `CI=true` instead.
    pub async fn start() -> Option<Self> {
        let Some((driver_bin, chromium)) = binaries() else { return skip("chromedriver or chromium not found") };
        let port = crate::redis_server::free_port(false)?;
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut browser = BrowserStart { driver: Some(driver) };
        let url = format!("http://127.0.0.1:{port}");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1024,900", "--no-first-run", "--password-store=basic"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut last = None;
        for _ in 0..100 {
            match ClientBuilder::new(connector.clone()).capabilities(capabilities.clone()).connect(&url).await {
                Ok(client) => return Some(Browser { client, driver: browser.driver.take()? }),
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(browser.driver.take());
        skip(&format!("chromedriver did not open a session: {}", last.unwrap_or_default()))
    }

    /// Writes a screenshot of the page to `target/browser/NAME.png` (a test artifact) and
    /// answers its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = artifacts();
        std::fs::create_dir_all(&dir).expect("artifact directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A driver started but not yet handed to a [`Browser`]: killed if the session never opens.
struct BrowserStart {
    driver: Option<Child>,
}

impl Drop for BrowserStart {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
    }
}

/// Where screenshots go: `browser/` in the workspace's target directory (`CARGO_TARGET_DIR` when
/// set).
pub fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("browser")
}
