//! What a load run measured: per RPC the count, the status codes, the
//! latencies of every call (failed ones included, as ghz counts them) as
//! percentiles and a histogram; for GenerateStream also time to first
//! token, the gaps between a candidate's deltas and tokens per second. The
//! JSON form keeps ghz's field names where they overlap (durations in
//! nanoseconds, histogram marks in seconds).

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

/// The percentiles reported, as ghz's `latencyDistribution` has them plus p99.9.
pub const PERCENTILES: [f64; 9] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0];

/// Buckets of the latency histogram, between the fastest and the slowest call.
const HISTOGRAM_BUCKETS: usize = 10;

/// One finished call.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub latency: Duration,
    pub code: tonic::Code,
}

/// One streamed Generate: its time to first delta, the gaps between each
/// candidate's successive deltas and the tokens the candidates finished with.
#[derive(Debug, Clone, Default)]
pub struct StreamTimes {
    pub first_delta: Option<Duration>,
    pub gaps: Vec<Duration>,
    pub tokens: u64,
    pub total: Duration,
}

/// Every call of one RPC.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub calls: Vec<Call>,
    /// The messages of failed calls (at most [`MAX_ERROR_MESSAGES`] kinds).
    pub errors: BTreeMap<String, u64>,
    pub streams: Vec<StreamTimes>,
}

/// Distinct error messages kept per RPC; the rest are counted under "…".
const MAX_ERROR_MESSAGES: usize = 20;

impl Samples {
    pub fn record(&mut self, latency: Duration, status: Result<(), &tonic::Status>) {
        let code = match status {
            Ok(()) => tonic::Code::Ok,
            Err(status) => {
                let key = format!("{}: {}", code_name(status.code()), status.message());
                let key = if self.errors.len() < MAX_ERROR_MESSAGES || self.errors.contains_key(&key) {
                    key
                } else {
                    "… (further messages)".to_string()
                };
                *self.errors.entry(key).or_insert(0) += 1;
                status.code()
            }
        };
        self.calls.push(Call { latency, code });
    }
}

/// ghz's name for a status code ("OK", "Unavailable", …).
pub fn code_name(code: tonic::Code) -> String {
    if code == tonic::Code::Ok { "OK".into() } else { format!("{code:?}") }
}

/// The `p`th percentile of sorted `values` by nearest rank: the smallest
/// value with at least p% of the values at or below it.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    pub percentage: f64,
    /// Nanoseconds.
    pub latency: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// The bucket's upper edge, in seconds.
    pub mark: f64,
    pub count: u64,
    pub frequency: f64,
}

/// A distribution of durations: count, mean, extremes, percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub count: u64,
    /// Nanoseconds, as all durations here.
    pub average: u64,
    pub fastest: u64,
    pub slowest: u64,
    #[serde(rename = "latencyDistribution")]
    pub latency_distribution: Vec<LatencyPoint>,
}

impl Distribution {
    pub fn of(values: &[Duration]) -> Distribution {
        let mut sorted = values.to_vec();
        sorted.sort();
        let nanos = |d: Duration| d.as_nanos() as u64;
        let total: u128 = sorted.iter().map(Duration::as_nanos).sum();
        Distribution {
            count: sorted.len() as u64,
            average: (total / sorted.len().max(1) as u128) as u64,
            fastest: sorted.first().copied().map_or(0, nanos),
            slowest: sorted.last().copied().map_or(0, nanos),
            latency_distribution: PERCENTILES
                .iter()
                .map(|&p| LatencyPoint { percentage: p, latency: nanos(percentile(&sorted, p)) })
                .collect(),
        }
    }

    /// The latency at `p` (one of [`PERCENTILES`]), in milliseconds.
    pub fn ms_at(&self, p: f64) -> f64 {
        self.latency_distribution.iter().find(|l| l.percentage == p).map_or(0.0, |l| l.latency as f64 / 1e6)
    }
}

/// One RPC's figures, in ghz's shape.
#[derive(Debug, Clone, Serialize)]
pub struct RpcReport {
    pub name: String,
    pub count: u64,
    /// Calls per second over the measured window.
    pub rps: f64,
    #[serde(flatten)]
    pub latency: Distribution,
    pub histogram: Vec<Bucket>,
    #[serde(rename = "statusCodeDistribution")]
    pub status_code_distribution: BTreeMap<String, u64>,
    #[serde(rename = "errorDistribution")]
    pub error_distribution: BTreeMap<String, u64>,
    /// GenerateStream only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamReport>,
}

/// GenerateStream's token timings.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub time_to_first_token: Distribution,
    pub inter_token: Distribution,
    /// Tokens the candidates finished with over the streams' wall time, per
    /// stream (all candidates of a stream together).
    pub tokens_per_second_p50: f64,
    /// All streams' tokens over the measured window.
    pub tokens_per_second_total: f64,
}

fn histogram(latencies: &[Duration]) -> Vec<Bucket> {
    let (Some(&fastest), Some(&slowest)) = (latencies.iter().min(), latencies.iter().max()) else {
        return Vec::new();
    };
    let (low, high) = (fastest.as_secs_f64(), slowest.as_secs_f64());
    let width = (high - low) / HISTOGRAM_BUCKETS as f64;
    let mut counts = [0u64; HISTOGRAM_BUCKETS];
    for latency in latencies {
        let offset = if width > 0.0 { ((latency.as_secs_f64() - low) / width) as usize } else { 0 };
        counts[offset.min(HISTOGRAM_BUCKETS - 1)] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, &count)| Bucket {
            mark: low + width * (i + 1) as f64,
            count,
            frequency: count as f64 / latencies.len() as f64,
        })
        .collect()
}

impl RpcReport {
    pub fn of(name: &str, samples: &Samples, window: Duration) -> RpcReport {
        let latencies: Vec<Duration> = samples.calls.iter().map(|c| c.latency).collect();
        let mut codes = BTreeMap::new();
        for call in &samples.calls {
            *codes.entry(code_name(call.code)).or_insert(0) += 1;
        }
        let seconds = window.as_secs_f64().max(1e-9);
        let stream = (!samples.streams.is_empty()).then(|| {
            let firsts: Vec<Duration> = samples.streams.iter().filter_map(|s| s.first_delta).collect();
            let gaps: Vec<Duration> = samples.streams.iter().flat_map(|s| s.gaps.iter().copied()).collect();
            let mut rates: Vec<f64> = samples
                .streams
                .iter()
                .filter(|s| s.tokens > 0 && !s.total.is_zero())
                .map(|s| s.tokens as f64 / s.total.as_secs_f64())
                .collect();
            rates.sort_by(f64::total_cmp);
            StreamReport {
                time_to_first_token: Distribution::of(&firsts),
                inter_token: Distribution::of(&gaps),
                tokens_per_second_p50: rates.get(rates.len().saturating_sub(1) / 2).copied().unwrap_or(0.0),
                tokens_per_second_total: samples.streams.iter().map(|s| s.tokens).sum::<u64>() as f64 / seconds,
            }
        });
        RpcReport {
            name: name.into(),
            count: latencies.len() as u64,
            rps: latencies.len() as f64 / seconds,
            latency: Distribution::of(&latencies),
            histogram: histogram(&latencies),
            status_code_distribution: codes,
            error_distribution: samples.errors.clone(),
            stream,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub date: String,
    pub pattern: String,
    /// "closed: N agents" or "open: R turns/s".
    pub arrival: String,
    /// Nanoseconds measured (after the warm-up).
    pub total: u64,
    /// Turns (a copilot turn, or one call in a single-RPC pattern) started
    /// in the measured window, and finished.
    pub turns_started: u64,
    pub turns_finished: u64,
    /// Open arrival only: the rate asked for, and turns not started because
    /// `max_in_flight` were already running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate: Option<f64>,
    pub achieved_rate: f64,
    pub turns_dropped: u64,
    /// Acknowledged annotations per second (copilot pattern).
    pub annotations_per_second: f64,
    pub rpcs: Vec<RpcReport>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.total as f64 / 1e9;
        writeln!(f, "load: {} pattern, {}, {seconds:.1} s measured", self.pattern, self.arrival)?;
        write!(
            f,
            "turns: {} started, {} finished, {:.2}/s achieved",
            self.turns_started, self.turns_finished, self.achieved_rate
        )?;
        if let Some(offered) = self.offered_rate {
            write!(f, " of {offered:.2}/s offered, {} dropped (max in flight)", self.turns_dropped)?;
        }
        writeln!(f)?;
        if self.annotations_per_second > 0.0 {
            writeln!(f, "annotations acknowledged: {:.2}/s", self.annotations_per_second)?;
        }
        writeln!(f, "| rpc | count | rps | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | status codes |")?;
        writeln!(f, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")?;
        for rpc in &self.rpcs {
            let codes: Vec<String> = rpc.status_code_distribution.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let l = &rpc.latency;
            writeln!(
                f,
                "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                rpc.name,
                rpc.count,
                rpc.rps,
                l.ms_at(50.0),
                l.ms_at(90.0),
                l.ms_at(99.0),
                l.ms_at(99.9),
                l.slowest as f64 / 1e6,
                codes.join(", ")
            )?;
        }
        for rpc in &self.rpcs {
            if let Some(stream) = &rpc.stream {
                let (t, g) = (&stream.time_to_first_token, &stream.inter_token);
                writeln!(
                    f,
                    "{}: time to first token p50 {:.1} ms, p99 {:.1} ms; between deltas p50 {:.1} ms, p99 {:.1} ms; \
                     tokens/s per stream p50 {:.1}, all streams {:.1}",
                    rpc.name,
                    t.ms_at(50.0),
                    t.ms_at(99.0),
                    g.ms_at(50.0),
                    g.ms_at(99.0),
                    stream.tokens_per_second_p50,
                    stream.tokens_per_second_total
                )?;
            }
        }
        for rpc in self.rpcs.iter().filter(|r| !r.error_distribution.is_empty()) {
            for (message, n) in &rpc.error_distribution {
                writeln!(f, "{} error ×{n}: {message}", rpc.name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let sorted = ms(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        // ceil(p/100 · 10)-th smallest.
        assert_eq!(percentile(&sorted, 50.0), Duration::from_millis(5));
        assert_eq!(percentile(&sorted, 90.0), Duration::from_millis(9));
        assert_eq!(percentile(&sorted, 99.0), Duration::from_millis(10));
        assert_eq!(percentile(&sorted, 10.0), Duration::from_millis(1));
        assert_eq!(percentile(&sorted, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        let d = Distribution::of(&ms(&[40, 10, 30, 20]));
        assert_eq!((d.count, d.average, d.fastest, d.slowest), (4, 25_000_000, 10_000_000, 40_000_000));
        assert_eq!(d.ms_at(50.0), 20.0);
        assert_eq!(d.ms_at(75.0), 30.0);
    }

    #[test]
    fn failed_calls_count_in_latencies_codes_and_messages() {
        let mut samples = Samples::default();
        samples.record(Duration::from_millis(10), Ok(()));
        samples.record(Duration::from_millis(30), Err(&tonic::Status::unavailable("no ranker")));
        samples.record(Duration::from_millis(21), Err(&tonic::Status::unavailable("no ranker")));
        let report = RpcReport::of("Rank", &samples, Duration::from_secs(2));
        assert_eq!(report.count, 3);
        assert_eq!(report.rps, 1.5);
        assert_eq!(report.status_code_distribution, BTreeMap::from([("OK".into(), 1), ("Unavailable".into(), 2)]));
        assert_eq!(report.error_distribution, BTreeMap::from([("Unavailable: no ranker".into(), 2)]));
        assert_eq!(report.latency.slowest, 30_000_000);
        // Ten buckets from 10 ms to 30 ms: the fastest in the first, the slowest in the last.
        let counts: Vec<u64> = report.histogram.iter().map(|b| b.count).collect();
        assert_eq!(counts, [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        assert!((report.histogram[9].mark - 0.030).abs() < 1e-12);
        let json = serde_json::to_value(&report).unwrap();
        for field in ["count", "rps", "average", "fastest", "slowest", "latencyDistribution", "histogram"] {
            assert!(json.get(field).is_some(), "ghz's field {field}: {json}");
        }
        assert_eq!(json["statusCodeDistribution"]["Unavailable"], 2);
    }
}
