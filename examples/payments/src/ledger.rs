//! The durable ledger: one JSON line per executed operation, appended before the response is sent.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

/// One executed operation as written to the ledger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// `payment`, `refund`, `transfer`, `quote`, `webhook`, `notification` or `settlement`.
    pub kind: String,
    /// The account that executed it.
    pub account: String,
    /// The operation's response body.
    pub operation: serde_json::Value,
}

/// Append-only JSON-lines file.
#[derive(Debug)]
pub struct Ledger {
    file: Mutex<File>,
}

impl Ledger {
    /// Opens (creating) the ledger at `path` and reads back the entries already in it. A torn last
    /// line (a crash mid-write) is skipped.
    pub fn open(path: &Path) -> Result<(Self, Vec<Entry>), String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| format!("cannot open ledger {}: {e}", path.display()))?;
        let mut entries = Vec::new();
        let reader =
            BufReader::new(File::open(path).map_err(|e| format!("cannot read ledger {}: {e}", path.display()))?);
        for line in reader.lines() {
            let line = line.map_err(|e| format!("cannot read ledger {}: {e}", path.display()))?;
            if let Ok(entry) = serde_json::from_str::<Entry>(&line) {
                entries.push(entry);
            }
        }
        Ok((Self { file: Mutex::new(file) }, entries))
    }

    /// Appends one line as it is (a JSON object and its newline) with a single write.
    pub fn append_raw(&self, line: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line)?;
        file.flush()
    }

    /// Appends one entry with a single write, so concurrent appends never interleave.
    pub fn append(&self, entry: &Entry) -> std::io::Result<()> {
        self.append_line(entry)
    }

    /// Appends any JSON object as one line, like [`append`](Self::append) (the settlement
    /// worker's lines carry `payment` and `amount` at their top level as well).
    pub fn append_line(&self, line: &impl Serialize) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line)?;
        file.flush()
    }
}
