//! What the device did, for the shutdown summary and the test oracles.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

#[derive(Debug, Default)]
pub struct Stats {
    by_type: Mutex<BTreeMap<&'static str, u64>>,
    fences_submitted: AtomicU64,
    fences_completed: AtomicU64,
    error_responses: AtomicU64,
    dropped: AtomicU64,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    /// One request of type `name` was served (whatever the answer).
    pub fn command(&self, name: &'static str) {
        let mut m = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(name).or_default() += 1;
    }

    pub fn fence_submitted(&self) {
        self.fences_submitted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fences_completed(&self, n: u64) {
        self.fences_completed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn error_response(&self) {
        self.error_responses.fetch_add(1, Ordering::Relaxed);
    }

    /// A chain returned without any response (nowhere to write one).
    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, name: &str) -> u64 {
        let m = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).copied().unwrap_or(0)
    }

    pub fn commands_total(&self) -> u64 {
        let m = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        m.values().sum()
    }

    pub fn fences(&self) -> (u64, u64) {
        (
            self.fences_submitted.load(Ordering::Relaxed),
            self.fences_completed.load(Ordering::Relaxed),
        )
    }

    pub fn errors(&self) -> u64 {
        self.error_responses.load(Ordering::Relaxed)
    }

    /// The summary as JSON: totals plus a per-type breakdown.
    pub fn summary(&self) -> serde_json::Value {
        let by_type = self
            .by_type
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (submitted, completed) = self.fences();
        json!({
            "commands": by_type.values().sum::<u64>(),
            "commands_by_type": by_type,
            "fences_submitted": submitted,
            "fences_completed": completed,
            "error_responses": self.errors(),
            "dropped": self.dropped.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts() {
        let s = Stats::new();
        s.command("SUBMIT_3D");
        s.command("SUBMIT_3D");
        s.command("GET_EDID");
        s.fence_submitted();
        s.fences_completed(1);
        s.error_response();
        let j = s.summary();
        assert_eq!(j["commands"], 3);
        assert_eq!(j["commands_by_type"]["SUBMIT_3D"], 2);
        assert_eq!(j["fences_submitted"], 1);
        assert_eq!(j["fences_completed"], 1);
        assert_eq!(j["error_responses"], 1);
        assert_eq!(j["dropped"], 0);
    }
}
