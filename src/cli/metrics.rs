//! `--metrics ADDR`: the process's Prometheus exporter.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Buckets of the `*_seconds` histograms: a millisecond to ten minutes.
const SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
/// Buckets of the staleness histogram, in policy versions.
const VERSIONS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0];

/// Installs the global recorder and serves it on http://`addr`/metrics from a thread of its own.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .context("histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full(chorus_orchestrator::metrics::TRAJECTORY_LAG.into()),
            VERSIONS,
        )
        .context("histogram buckets")?
        .install()
        .with_context(|| format!("--metrics {addr}: serving Prometheus metrics"))?;
    tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
    Ok(())
}
