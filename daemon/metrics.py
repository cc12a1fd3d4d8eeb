"""Prometheus metrics of the daemon and the query service.

Names are part of fogline's operating contract: the Grafana dashboard and the
alert rules under ``ops/`` refer to them, so rename only with both.
The daemon's metrics live in ``REGISTRY`` (served by ``fogline run`` on
``metrics_port``) and the query service's in ``QUERY_REGISTRY`` (served at the
API's ``/metrics``), so each process exports only the series it sets.
Tests read values from them with ``get_sample_value``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
QUERY_REGISTRY = CollectorRegistry(auto_describe=True)

# --- daemon: ingestion -----------------------------------------------------
RECORDS_IN = Counter(
    "fogline_records_in", "Records consumed from Kafka.", ["topic"], registry=REGISTRY
)
RECORDS_ABSORBED = Counter(
    "fogline_records_absorbed", "Valid records absorbed into the posterior.", registry=REGISTRY
)
RECORDS_WARMING = Counter(
    "fogline_records_warming",
    "Autoregressive models: valid records that only filled their key's lag buffer "
    "(fewer than L past values; neither learnt nor dead-lettered).",
    registry=REGISTRY,
)
RECORDS_DEAD_LETTERED = Counter(
    "fogline_records_dead_lettered",
    "Records sent to the dead-letter topic.",
    ["reason"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "fogline_consumer_lag", "Records behind the high-water mark.", ["partition"], registry=REGISTRY
)
OFFSET_OUT_OF_RANGE = Counter(
    "fogline_offset_out_of_range",
    "Snapshot offsets a partition cannot resume from at assignment (cause: beyond_end, "
    "fingerprint_mismatch, record_gone).",
    ["partition", "action", "cause"],
    registry=REGISTRY,
)
# --- daemon: inference -----------------------------------------------------
BATCH_SECONDS = Histogram(
    "fogline_batch_seconds",
    "Wall time to absorb one micro-batch (decode to step done).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
SVI_LOSS = Gauge(
    "fogline_svi_loss", "Last SVI loss per observation (negative ELBO / n).", registry=REGISTRY
)
STEPS_REJECTED = Counter(
    "fogline_steps_rejected",
    "SVI steps rejected for a non-finite loss or parameter.",
    registry=REGISTRY,
)
DEVICE_INFO = Gauge(
    "fogline_device_info", "Device the posterior lives on (value 1).", ["device"], registry=REGISTRY
)
# --- daemon: snapshots -----------------------------------------------------
SNAPSHOT_WRITE_SECONDS = Histogram(
    "fogline_snapshot_write_seconds",
    "Wall time of one atomic snapshot write to Redis.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
SNAPSHOT_FALLBACKS = Counter(
    "fogline_snapshot_fallbacks",
    "Start-ups that restored an older version because latest was missing or not intact.",
    registry=REGISTRY,
)
SNAPSHOT_VERSION = Gauge(
    "fogline_snapshot_version", "Last snapshot version written.", registry=REGISTRY
)
SNAPSHOT_LAST_WRITE = Gauge(
    "fogline_snapshot_last_write_timestamp_seconds",
    "Unix time of the last snapshot written.",
    registry=REGISTRY,
)
REDIS_UP = Gauge(
    "fogline_redis_up", "1 while the snapshot store answers, else 0.", registry=REGISTRY
)
# --- daemon: drift ---------------------------------------------------------
PREDICTIVE_KL = Gauge(
    "fogline_predictive_kl",
    "Predictive KL of the last batch: posterior after the batch vs the reference (nats).",
    registry=REGISTRY,
)
STEP_KL = Gauge(
    "fogline_step_kl",
    "Predictive KL between the posteriors after and before the last batch (nats).",
    registry=REGISTRY,
)
PREDICTIVE_KL_THRESHOLD = Gauge(
    "fogline_predictive_kl_threshold",
    "Calibrated per-batch predictive (step) KL below which recovery counts as settled; "
    "NaN until calibrated.",
    registry=REGISTRY,
)
SURPRISAL = Gauge(
    "fogline_surprisal",
    "Alarm signal of the last batch: mean surprisal under the reference (nats/record).",
    registry=REGISTRY,
)
SURPRISAL_THRESHOLD = Gauge(
    "fogline_surprisal_threshold",
    "Alarm threshold on the surprisal, calibrated for drift.ert; NaN until calibrated.",
    registry=REGISTRY,
)
DRIFT_ALARMS = Counter("fogline_drift_alarms", "Drift alarms raised.", registry=REGISTRY)
DRIFT_CALIBRATING = Gauge(
    "fogline_drift_calibrating",
    "1 while the alarm threshold is being (re)fitted on no-drift batches.",
    registry=REGISTRY,
)
POLICY_STATE = Gauge(
    "fogline_policy_state",
    "Adaptation policy state (1 for the current one).",
    ["state"],
    registry=REGISTRY,
)
LIKELIHOOD_WEIGHT = Gauge(
    "fogline_likelihood_weight",
    "Likelihood weight (generalised-Bayes beta) the last batch was absorbed with.",
    registry=REGISTRY,
)
OUTLIERS_DROPPED = Counter(
    "fogline_outliers_dropped",
    "Gross-outlier records given weight 0 by the drift policy.",
    registry=REGISTRY,
)
# --- query service ---------------------------------------------------------
QUERY_SECONDS = Histogram(
    "fogline_query_request_seconds",
    "Query service request latency.",
    ["endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=QUERY_REGISTRY,
)
QUERY_SNAPSHOT_VERSION = Gauge(
    "fogline_query_snapshot_version",
    "Snapshot version the query service answers from.",
    registry=QUERY_REGISTRY,
)
QUERY_RELOADS = Counter(
    "fogline_query_reloads", "Snapshot reloads by the query service.", registry=QUERY_REGISTRY
)

# keyed mode (keyed.enabled): bounded cardinality, no key label
KEYS_IN_MEMORY = Gauge(
    "fogline_keys_in_memory", "Key states held in memory (keyed mode).", registry=REGISTRY
)
KEYS_EVICTED = Counter(
    "fogline_keys_evicted", "Clean key states evicted from memory (keyed mode).", registry=REGISTRY
)
PARTITIONS_OWNED = Gauge(
    "fogline_partitions_owned",
    "Partitions whose lease this daemon holds (keyed mode).",
    registry=REGISTRY,
)
PARTITION_RESUME_SECONDS = Histogram(
    "fogline_partition_resume_seconds",
    "Seconds from a partition's assignment to its resumption (lease taken, manifest read).",
    registry=REGISTRY,
)
