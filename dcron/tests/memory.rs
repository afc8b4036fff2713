//! The memory registry against the conformance suite.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{RawKind, Registry};
use dcron::MemoryRegistry;

struct Memory(MemoryRegistry);

impl conformance::Harness for Memory {
    async fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.0.clone())
    }

    async fn write_raw(&self, ns: &str, kind: RawKind, name: &str, raw: &[u8]) {
        self.0.write_raw(ns, kind, name, raw);
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_millis(600)
    }
}

conformance::suite!(Memory(MemoryRegistry::new()));
