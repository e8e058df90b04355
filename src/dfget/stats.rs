//! dfdaemon's counters as dfget reads them from its `/metrics` endpoint, and
//! the difference a pull made to them.

use std::collections::BTreeMap;

use anyhow::Context;

/// The counters dfget reports, by metric name and label value.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counters(BTreeMap<(String, String), f64>);

/// The metrics dfget reads, and the label that tells their values apart.
const REPORTED: [(&str, &str); 4] = [
    ("damselfly_dfdaemon_unpacked_layers_total", "source"),
    ("damselfly_dfdaemon_unpacked_tar_bytes_total", ""),
    ("damselfly_dfdaemon_fast_path_declined_total", "reason"),
    ("damselfly_dfdaemon_received_bytes_total", "source"),
];

impl Counters {
    /// Parses the Prometheus text exposition `text`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).context("parse dfdaemon's metrics")?;
        let mut counters = BTreeMap::new();
        for sample in scrape.samples {
            let Some((_, label)) = REPORTED.iter().find(|(name, _)| sample.metric == *name) else {
                continue;
            };
            let value = match sample.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            let key = sample.labels.get(label).unwrap_or("").to_owned();
            counters.insert((sample.metric, key), value);
        }
        Ok(Self(counters))
    }

    /// Fetches and parses dfdaemon's metrics at `url`.
    pub async fn fetch(url: &str) -> anyhow::Result<Self> {
        crate::registry::install_crypto_provider();
        let text = reqwest::get(url)
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("read dfdaemon's metrics at {url}"))?
            .text()
            .await
            .with_context(|| format!("read dfdaemon's metrics at {url}"))?;
        Self::parse(&text)
    }

    /// What grew from `before` to `self`, by label value, for `metric`.
    pub fn growth(&self, before: &Self, metric: &str) -> Vec<(String, f64)> {
        self.0
            .iter()
            .filter(|((name, _), _)| name == metric)
            .map(|((name, label), after)| {
                let was = before
                    .0
                    .get(&(name.clone(), label.clone()))
                    .copied()
                    .unwrap_or(0.0);
                (label.clone(), after - was)
            })
            .filter(|(_, grew)| *grew > 0.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_by_label_and_skips_what_did_not_move() {
        let before = Counters::parse(
            "# TYPE damselfly_dfdaemon_unpacked_layers counter\n\
             damselfly_dfdaemon_unpacked_layers_total{source=\"registry\"} 2\n",
        )
        .unwrap();
        let after = Counters::parse(
            "# TYPE damselfly_dfdaemon_unpacked_layers counter\n\
             damselfly_dfdaemon_unpacked_layers_total{source=\"registry\"} 2\n\
             damselfly_dfdaemon_unpacked_layers_total{source=\"peers\"} 3\n\
             # TYPE other counter\nother_total 9\n",
        )
        .unwrap();
        assert_eq!(
            after.growth(&before, "damselfly_dfdaemon_unpacked_layers_total"),
            vec![("peers".to_owned(), 3.0)]
        );
        assert!(after.growth(&before, "other_total").is_empty());
    }
}
