//! Prometheus metrics of the server: what it is asked (gRPC requests by method and status
//! code, their latency), how the batcher keeps up (queue depth, batch size and fill,
//! forward passes, tokens and their latency), the model's load state, and the score
//! store's counters. [`grpc`] counts requests as a tower layer on the tonic server;
//! [`endpoint`] serves `GET /metrics` on its own port (`--metrics-listen`).
//!
//! The metrics live in one process-wide registry ([`metrics()`]), as serving systems
//! keep them: the batcher thread, the engine and the transport each record what they see
//! with a one-line call, without a handle threaded through every constructor. Recording
//! is a few atomic operations, so it happens whether or not anything is exported (the
//! local `ref-server score --model` records into a registry nobody reads).
//!
//! Names follow Prometheus' conventions: the `dpo_ref_` prefix, `_total` for counters,
//! `_seconds` for durations, base units, and `_info` for a labelled constant 1.

pub mod endpoint;
pub mod grpc;

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use dpo_common::logprob::SharedPrompt;
use dpo_proto::v1;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Latencies from a cached answer (about a millisecond) to a large request on a CPU.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Sequences (scored responses) per forward pass.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Real tokens / padded tokens of a forward pass; `--min-batch-fill` is usually 0.5-0.95.
const FILL_BUCKETS: &[f64] = &[0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0];

/// Where the model stands, as the `dpo_ref_model_state` gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading = 0,
    Serving = 1,
    Failed = 2,
}

/// The score store's cumulative counters, as its stats snapshot reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Scores answered from the store, without a forward pass.
    pub hits: u64,
    /// Scores the store did not hold (computed, then stored).
    pub misses: u64,
    /// Requests that waited for the same score being computed for another (single flight).
    pub single_flight_waits: u64,
    /// Entries evicted to keep the store within its size bound.
    pub evictions: u64,
}

/// Reads the store's counters at scrape time.
type StoreSource = Box<dyn Fn() -> StoreCounters + Send + Sync>;

/// Every metric of the server, registered in its own [`Registry`].
pub struct Metrics {
    registry: Registry,
    // gRPC, recorded by the [`grpc`] layer.
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    stream_messages: IntCounterVec,
    stream_message_seconds: Histogram,
    // The batcher.
    queued_sequences: IntGauge,
    queued_tokens: IntGauge,
    batch_sequences: Histogram,
    batch_fill: Histogram,
    forward_passes: IntCounter,
    forward_tokens: IntCounter,
    forward_seconds: Histogram,
    // The model.
    model_state: IntGauge,
    model_load_seconds: Gauge,
    model_info: IntGaugeVec,
    // The score store.
    store_hits: IntCounter,
    store_misses: IntCounter,
    store_single_flight_waits: IntCounter,
    store_evictions: IntCounter,
    store_source: Mutex<Option<StoreSource>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics (see the module doc for why there is one registry).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // The names and label sets below are constants: registering them cannot fail
        // unless this file is wrong, which the unit tests catch.
        fn add<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone())).expect("a valid, unique metric");
            m
        }
        let counter = |name: &str, help: &str| {
            add(&registry, IntCounter::with_opts(Opts::new(name, help)).expect("valid counter"))
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            add(&registry, Histogram::with_opts(opts).expect("valid histogram"))
        };
        let int_gauge = |name: &str, help: &str| {
            add(&registry, IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge"))
        };
        let m = Metrics {
            requests: add(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "dpo_ref_grpc_requests_total",
                        "gRPC calls finished, by service, method and status code",
                    ),
                    &["service", "method", "code"],
                )
                .expect("valid counter"),
            ),
            request_seconds: add(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "dpo_ref_grpc_request_duration_seconds",
                        "gRPC call duration, from the request's arrival to the response's end \
                         (a stream's whole life for ScoreStream, Generate and Watch)",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["service", "method"],
                )
                .expect("valid histogram"),
            ),
            stream_messages: add(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "dpo_ref_score_stream_messages_total",
                        "ScoreStream requests answered, by the status code in their answer",
                    ),
                    &["code"],
                )
                .expect("valid counter"),
            ),
            stream_message_seconds: histogram(
                "dpo_ref_score_stream_message_duration_seconds",
                "Time to answer one ScoreStream request, from reading it to its answer",
                LATENCY_BUCKETS,
            ),
            queued_sequences: int_gauge(
                "dpo_ref_queue_sequences",
                "Sequences (responses) submitted to the batcher and not yet scored, \
                 including those waiting for room in the queue",
            ),
            queued_tokens: int_gauge(
                "dpo_ref_queue_tokens",
                "Row tokens submitted to the batcher and not yet scored (bounded by \
                 --max-queued-tokens, plus requests waiting for room)",
            ),
            batch_sequences: histogram(
                "dpo_ref_batch_sequences",
                "Sequences (responses) scored per forward pass",
                BATCH_BUCKETS,
            ),
            batch_fill: histogram(
                "dpo_ref_batch_fill_ratio",
                "Real tokens / padded tokens of a forward pass",
                FILL_BUCKETS,
            ),
            forward_passes: counter(
                "dpo_ref_forward_passes_total",
                "Forward passes of the batcher (failed ones included)",
            ),
            forward_tokens: counter(
                "dpo_ref_forward_tokens_total",
                "Tokens in the rows of the batcher's forward passes (padding excluded, a \
                 pair's prompt once); tokens/s is rate() of this",
            ),
            forward_seconds: histogram(
                "dpo_ref_forward_duration_seconds",
                "Duration of one forward pass of the batcher",
                LATENCY_BUCKETS,
            ),
            model_state: int_gauge(
                "dpo_ref_model_state",
                "The reference model: 0 loading, 1 serving, 2 failed to load",
            ),
            model_load_seconds: add(
                &registry,
                Gauge::with_opts(Opts::new(
                    "dpo_ref_model_load_seconds",
                    "Time the model took to load (0 until it is loaded)",
                ))
                .expect("valid gauge"),
            ),
            model_info: add(
                &registry,
                IntGaugeVec::new(
                    Opts::new("dpo_ref_model_info", "The served model (constant 1)"),
                    &["fingerprint", "dtype", "device"],
                )
                .expect("valid gauge"),
            ),
            store_hits: counter(
                "dpo_ref_store_hits_total",
                "Scores answered from the score store without a forward pass",
            ),
            store_misses: counter(
                "dpo_ref_store_misses_total",
                "Scores the score store did not hold",
            ),
            store_single_flight_waits: counter(
                "dpo_ref_store_single_flight_waits_total",
                "Requests that waited for a score another request was computing",
            ),
            store_evictions: counter(
                "dpo_ref_store_evictions_total",
                "Score store entries evicted to stay within its size bound",
            ),
            store_source: Mutex::new(None),
            registry,
        };
        // Series that exist before their first event, so that rate() and absent() work
        // from the start rather than from the first request.
        for method in grpc::REFERENCE_METHODS {
            m.requests.with_label_values(&[grpc::REFERENCE_SERVICE, method, "OK"]);
            m.request_seconds.with_label_values(&[grpc::REFERENCE_SERVICE, method]);
        }
        m.stream_messages.with_label_values(&["OK"]);
        m
    }

    /// The metrics in Prometheus' text exposition format, the store's counters read first.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        if let Some(source) = self.store_source.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            self.set_store_counters(&source());
        }
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    /// A finished gRPC call (see [`grpc`]).
    fn grpc_call(&self, service: &str, method: &str, code: &str, elapsed: Duration) {
        self.requests.with_label_values(&[service, method, code]).inc();
        self.request_seconds.with_label_values(&[service, method]).observe(elapsed.as_secs_f64());
    }

    /// One `ScoreStream` request answered with `answer` (its status code is the answer's
    /// `error`, OK without one), `started` when it was read.
    pub fn score_stream_message(&self, answer: &v1::ScoreResponse, started: std::time::Instant) {
        let code = answer.error.as_ref().map_or(0, |e| e.code);
        self.stream_messages.with_label_values(&[grpc::code_name(code)]).inc();
        self.stream_message_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Counts `rows` as queued until the returned guard is dropped: held by the request
    /// while it waits for its scores, so the count falls before the answer is sent, and
    /// also when the request fails or its client goes away.
    pub fn enqueue(&self, rows: &[SharedPrompt]) -> QueuedWork {
        let work = QueuedWork {
            sequences: rows.iter().map(|r| r.responses.len() as i64).sum(),
            tokens: rows.iter().map(|r| r.row_len() as i64).sum(),
        };
        self.queued_sequences.add(work.sequences);
        self.queued_tokens.add(work.tokens);
        work
    }

    /// One forward pass of the batcher over `rows` (padded to the longest).
    pub fn forward_pass(&self, rows: &[SharedPrompt], elapsed: Duration) {
        let real: usize = rows.iter().map(SharedPrompt::row_len).sum();
        let padded = rows.len() * rows.iter().map(SharedPrompt::row_len).max().unwrap_or(0);
        self.forward_passes.inc();
        self.forward_tokens.inc_by(real as u64);
        self.forward_seconds.observe(elapsed.as_secs_f64());
        self.batch_sequences.observe(rows.iter().map(|r| r.responses.len()).sum::<usize>() as f64);
        if padded > 0 {
            self.batch_fill.observe(real as f64 / padded as f64);
        }
    }

    /// Sets the model's load state (serving is set by [`Metrics::model_loaded`], with the
    /// model's identity).
    pub fn model_state(&self, state: ModelState) {
        self.model_state.set(state as i64);
    }

    /// The model is loaded and served: its identity and how long loading took.
    pub fn model_loaded(&self, info: &v1::ModelInfoResponse, load_time: Duration) {
        self.model_info.reset();
        self.model_info.with_label_values(&[&info.fingerprint, &info.dtype, &info.device]).set(1);
        self.model_load_seconds.set(load_time.as_secs_f64());
        self.model_state(ModelState::Serving);
    }

    /// Sets the `dpo_ref_store_*_total` counters to the store's cumulative `counters`.
    pub fn set_store_counters(&self, counters: &StoreCounters) {
        set_counter(&self.store_hits, counters.hits);
        set_counter(&self.store_misses, counters.misses);
        set_counter(&self.store_single_flight_waits, counters.single_flight_waits);
        set_counter(&self.store_evictions, counters.evictions);
    }

    /// The hook for the score store: `source` is read at every scrape and sets the
    /// `dpo_ref_store_*_total` counters (until then they read 0).
    pub fn set_store_source(&self, source: impl Fn() -> StoreCounters + Send + Sync + 'static) {
        *self.store_source.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(source));
    }
}

/// Sets a Prometheus counter to a cumulative value kept elsewhere. A value below the
/// counter's (the source restarted) is a counter reset, which rate() already handles.
fn set_counter(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value < current {
        counter.reset();
        counter.inc_by(value);
    } else {
        counter.inc_by(value - current);
    }
}

/// Work counted in the queue gauges while it is alive (see [`Metrics::enqueue`]).
#[must_use = "the work counts as queued only while the guard lives"]
pub struct QueuedWork {
    sequences: i64,
    tokens: i64,
}

impl Drop for QueuedWork {
    fn drop(&mut self) {
        let m = metrics();
        m.queued_sequences.sub(self.sequences);
        m.queued_tokens.sub(self.tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prompt: usize, responses: &[usize]) -> SharedPrompt {
        SharedPrompt {
            prompt: vec![1; prompt],
            responses: responses.iter().map(|&n| vec![2; n]).collect(),
        }
    }

    /// The value of the sample `series` (name with its labels, as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.parse().expect("a number"))
    }

    // The registry is shared by the tests of this process: each test reads the metrics
    // it changes as differences, or ones no other test touches.

    #[test]
    fn every_metric_registers_and_renders() {
        let text = metrics().render().unwrap();
        for name in [
            "dpo_ref_grpc_requests_total",
            "dpo_ref_queue_sequences",
            "dpo_ref_queue_tokens",
            "dpo_ref_model_state",
            "dpo_ref_model_load_seconds",
            "dpo_ref_store_hits_total",
            "dpo_ref_store_misses_total",
            "dpo_ref_store_single_flight_waits_total",
            "dpo_ref_store_evictions_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{text}");
        }
        assert!(text.contains(
            "dpo_ref_grpc_requests_total{code=\"OK\",method=\"Score\",service=\"dpo.v1.Reference\"}"
        ));
    }

    #[test]
    fn forward_passes_record_size_fill_and_tokens() {
        let before = metrics().render().unwrap();
        // Rows of 4+2+2=8 and 4+4=8 tokens: no padding; then 2 and 6: 8 of 12 padded.
        metrics().forward_pass(&[row(4, &[2, 2]), row(4, &[4])], Duration::from_millis(20));
        metrics().forward_pass(&[row(1, &[1]), row(3, &[3])], Duration::from_millis(20));
        let after = metrics().render().unwrap();
        let delta = |s: &str| sample(&after, s).unwrap() - sample(&before, s).unwrap_or(0.0);
        assert_eq!(delta("dpo_ref_forward_passes_total"), 2.0);
        assert_eq!(delta("dpo_ref_forward_tokens_total"), 24.0);
        assert_eq!(delta("dpo_ref_batch_sequences_sum"), 5.0);
        assert_eq!(delta("dpo_ref_batch_fill_ratio_bucket{le=\"0.7\"}"), 1.0);
        assert_eq!(delta("dpo_ref_batch_fill_ratio_bucket{le=\"1\"}"), 2.0);
        assert_eq!(delta("dpo_ref_forward_duration_seconds_count"), 2.0);
    }

    #[test]
    fn queued_work_counts_until_dropped() {
        let gauges = || {
            let m = metrics();
            (m.queued_sequences.get(), m.queued_tokens.get())
        };
        let (seqs, tokens) = gauges();
        let guard = metrics().enqueue(&[row(3, &[2, 1]), row(5, &[5])]);
        // Other tests may queue concurrently only through the batcher, which these unit
        // tests do not start.
        assert_eq!(gauges(), (seqs + 3, tokens + 16));
        drop(guard);
        assert_eq!(gauges(), (seqs, tokens));
    }

    #[test]
    fn store_counters_follow_their_source() {
        metrics().set_store_source(|| StoreCounters {
            hits: 7,
            misses: 3,
            single_flight_waits: 1,
            evictions: 0,
        });
        let text = metrics().render().unwrap();
        assert_eq!(sample(&text, "dpo_ref_store_hits_total"), Some(7.0));
        assert_eq!(sample(&text, "dpo_ref_store_misses_total"), Some(3.0));
        assert_eq!(sample(&text, "dpo_ref_store_single_flight_waits_total"), Some(1.0));
        assert_eq!(sample(&text, "dpo_ref_store_evictions_total"), Some(0.0));
        // A store that starts counting again (reopened) resets the counter.
        metrics().set_store_source(|| StoreCounters { hits: 2, ..StoreCounters::default() });
        let text = metrics().render().unwrap();
        assert_eq!(sample(&text, "dpo_ref_store_hits_total"), Some(2.0));
    }

    #[test]
    fn model_info_is_labelled() {
        let info = v1::ModelInfoResponse {
            fingerprint: "abc123".into(),
            dtype: "float32".into(),
            device: "cpu".into(),
            ..Default::default()
        };
        metrics().model_loaded(&info, Duration::from_millis(1500));
        let text = metrics().render().unwrap();
        assert_eq!(
            sample(
                &text,
                "dpo_ref_model_info{device=\"cpu\",dtype=\"float32\",fingerprint=\"abc123\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, "dpo_ref_model_load_seconds"), Some(1.5));
        assert_eq!(sample(&text, "dpo_ref_model_state"), Some(1.0));
    }
}
