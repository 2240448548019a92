//! Demo binaries run as real processes: started with an environment, found by the address they
//! print, killed when dropped. Their stderr (the log) is kept, to explain a failed assertion.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running demo process.
#[derive(Debug)]
pub struct DemoProcess {
    /// The child process.
    pub child: Child,
    /// `127.0.0.1:PORT` it listens on.
    pub addr: String,
    /// Its "listening on" line, which also names the store and the ledger.
    pub banner: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl DemoProcess {
    /// Starts `cmd` (with `PAYMENTS_ADDR=127.0.0.1:0`) and waits up to 30 seconds for its
    /// `listening on http://ADDR` line on stderr; panics, after killing it, if none comes.
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd.env("PAYMENTS_ADDR", "127.0.0.1:0").stderr(Stdio::piped()).spawn().expect("spawn demo");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send((addr, line.clone()));
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((addr, banner)) => Self { child, addr, banner, log },
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not print its address");
            }
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `within` for it to exit; its exit
    /// status, or `None` (after killing it) if it did not exit in time.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(sent.as_ref().is_ok_and(|s| s.success()), "kill -TERM {}: {sent:?}", self.child.id());
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// The lines it has written on stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Kills the process at once (SIGKILL: no clean-up of any kind) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `script` (`sh`) once this test binary has exited: how the servers the tests start are
/// stopped and their directories removed, even when a test panics or the binary is killed.
pub fn after_exit(script: &str) -> Option<Child> {
    let script = format!("while kill -0 {me} 2>/dev/null; do sleep 1; done; {script}", me = std::process::id());
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}
