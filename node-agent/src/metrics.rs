//! The agent's Prometheus metrics. Labels are small fixed sets (operation, result, error
//! category, read engine), never object names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    pub engine: &'static str,
}

/// Every metric of the agent, registered once.
#[derive(Debug, Default)]
pub struct Metrics {
    pub read_bytes: Counter,
    pub throttle_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub volumes_in_progress: Gauge,
    /// Volumes waiting for a slot under the node's concurrency limit.
    pub queue_depth: Gauge,
    pub volumes: Family<VolumeLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    /// 1 for the read engine in use: `io_uring`, or `pread` when io_uring is off or forbidden.
    pub read_engine: Family<EngineLabels, Gauge>,
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("stash_agent");
        registry.register(
            "read_bytes",
            "Bytes read from volumes",
            self.read_bytes.clone(),
        );
        registry.register(
            "throttle_seconds",
            "Time reads waited for the node's IO budget",
            self.throttle_seconds.clone(),
        );
        registry.register(
            "volumes_in_progress",
            "Volumes being read or restored",
            self.volumes_in_progress.clone(),
        );
        registry.register(
            "queue_depth",
            "Volumes waiting for a slot",
            self.queue_depth.clone(),
        );
        registry.register(
            "volumes",
            "Volumes finished, by operation and result",
            self.volumes.clone(),
        );
        registry.register(
            "failures",
            "Failed volumes, by error category",
            self.failures.clone(),
        );
        registry.register(
            "read_engine",
            "The read engine in use",
            self.read_engine.clone(),
        );
        registry
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_fixed_labels() {
        let m = Metrics::default();
        m.read_bytes.inc_by(42);
        m.failures
            .get_or_create(&FailureLabels { category: "locked" })
            .inc();
        m.read_engine
            .get_or_create(&EngineLabels { engine: "io_uring" })
            .set(1);
        let text = m.encode();
        assert!(text.contains("stash_agent_read_bytes_total 42"), "{text}");
        assert!(
            text.contains(r#"stash_agent_failures_total{category="locked"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"stash_agent_read_engine{engine="io_uring"} 1"#),
            "{text}"
        );
    }
}
