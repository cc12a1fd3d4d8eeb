"""``fogline bench keyed``: a posterior per key, batched step vs a loop over keys, memory per key.

Parts (each a function returning its part of the one JSON record):

* **step** (:func:`step_part`): ``--keys`` K keys, each its own posterior
  (from one fleet prior, :func:`fogline.models.keyed.new_key_state`) and its
  own rows per micro-batch (``--rows`` on average, 1 to 2x rows - 1, seeded,
  so some keys have a single row).  The same micro-batches are stepped, in
  interleaved timed blocks after a warm-up, by the daemon's update
  (``batched``: the keys resident in the key cache's table, stepped in place by
  ``KeyedUpdate.step_cached``, then marked dirty), by the loop
  :func:`fogline.models.keyed.keyed_step_loop` (``stream_step`` per key) and,
  beside, by :func:`fogline.models.keyed.keyed_step` over per-key states (the
  drift loop's path).  ``key_steps_per_s`` = keys stepped per second (median
  of ``--repeats`` blocks, wall clock; ``*_cpu_*`` the same in this thread's
  CPU time); ``ratio = batched / loop`` (goal >= 20 at 1,000 keys).  The
  table's bytes per key are reported with it.
* **memory** (:func:`memory_part`): bytes of state per key, measured on a
  stepped key: the tensor bytes of its :class:`~fogline.models.state.PosteriorState`
  (params, Adam moments, prior, RNG state, aux), its serialised blob
  (:func:`fogline.models.serialize.to_bytes`), the same two with the key's drift
  state (:class:`fogline.drift.keyed.KeyedDriftLoop`: reference ensemble of
  ``--ensemble-size`` draws included in the tensor bytes), and the distinct
  tensor storage of all K stepped states per key (a shared fleet prior counted once).
* **daemon** (:func:`daemon_part`): records/s of the keyed daemon against a
  bare consume + decode loop in the same run (:mod:`fogline.bench.keyed_daemon`:
  ``--keys`` keys, batches of about ``--rows`` rows per key, hidden layers as
  above; the consumer in a child process unless ``--no-source-process``), one
  daemon run per ``--drift`` policy (default ``forget,off``; the first, the
  default policy, is the headline ``daemon_ratio``).  ``--skip-step`` runs it alone.
  ``--daemon-batches`` (default 8) batches per partition: at the default drift
  settings all 8 fall inside every key's 40-batch calibration window (the step-KL
  pass runs for every key); 48 also times the batch where every key fits its alarm
  threshold and the calibrated regime after it (six times the records).

``--json`` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fogline.models.config import ModelConfig
from fogline.models.fprior import EXTRA_KEY, LR_SCALE_KEY, FunctionalPrior
from fogline.models.keyed import fleet_prior, keyed_step, keyed_step_loop, new_key_state
from fogline.models.keyed_table import table_bytes_per_key
from fogline.models.serialize import to_bytes
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.svi import init_state

if TYPE_CHECKING:
    from fogline.daemon.config import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fogline bench keyed", description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1000, help="keys per micro-batch (default 1000)")
    p.add_argument("--rows", type=int, default=8, help="mean rows per key per micro-batch")
    p.add_argument("--hidden", type=int, default=32, help="width of each hidden layer")
    p.add_argument("--layers", type=int, default=2, help="number of hidden layers")
    p.add_argument("--in-features", type=int, default=8, help="input features D")
    p.add_argument("--guide", choices=("meanfield", "lowrank"), default="meanfield")
    p.add_argument(
        "--functional-prior", action="store_true", help="the keys carry a functional prior"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per path (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed micro-batches per path first")
    p.add_argument("--ensemble-size", type=int, default=32, help="drift reference draws per key")
    p.add_argument("--skip-daemon", action="store_true", help="no daemon records/s part")
    p.add_argument(
        "--skip-step", action="store_true", help="no step and memory parts (the daemon part alone)"
    )
    p.add_argument(
        "--drift",
        default="forget,off",
        help="daemon part: drift.policy of each daemon run, comma-separated; the first is the "
        "headline daemon_ratio (default forget,off: the default policy, then plain SVI)",
    )
    p.add_argument(
        "--daemon-batches",
        type=int,
        default=8,
        help="daemon part: batches per partition (default 8, all inside each key's "
        "calibration window at the default drift settings; 48 runs past its end)",
    )
    p.add_argument(
        "--no-source-process",
        action="store_true",
        help="daemon part: the keyed consumer in the daemon's process (stream.source_process off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return p


def _config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "in_features": args.in_features,
            "hidden": (args.hidden,) * args.layers,
            "guide": args.guide,
        }
    )


def fleet(args: argparse.Namespace, device: torch.device) -> PosteriorState:
    """The fleet prior every key starts from (a fresh net; optionally a functional prior)."""
    st = init_state(_config(args), seed=args.seed, device=device)
    if args.functional_prior:
        d = args.in_features
        fp = FunctionalPrior(weight=0.05, scale=1.5, lo=(-2.0,) * d, hi=(2.0,) * d)
        st = st.replace(extra={EXTRA_KEY: fp.to_dict(), LR_SCALE_KEY: 0.05})
    return fleet_prior(st)


def micro_batch(args: argparse.Namespace, device: torch.device) -> dict[str, Minibatch]:
    """One micro-batch: key i has 1 .. 2 rows - 1 rows (seeded), y = sin(3 x0) + noise."""
    g = torch.Generator().manual_seed(args.seed + 1)
    sizes = torch.randint(1, max(2, 2 * args.rows), (args.keys,), generator=g).tolist()
    out: dict[str, Minibatch] = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, args.in_features, generator=g)
        y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
        out[f"key-{i:05d}"] = Minibatch(x.to(device), y.to(device))
    return out


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call of ``fn``.

    The CPU time is reported beside the wall clock: on a shared machine it is
    less disturbed by other processes (it means little on CUDA).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, max(time.thread_time() - c0, 1e-9)


def _settings(args: argparse.Namespace) -> Settings:
    """Daemon settings of the timed update: one SVI step a batch, no drift loop."""
    from fogline.daemon.config import Settings

    return Settings.load(
        None,
        model_name="bench-keyed",
        metrics_port=0,
        kafka={"bootstrap_servers": "unused:9092", "topic": "t", "group_id": "g"},
        stream={"device": args.device, "steps_per_batch": 1, "functional_prior": True},
        drift={"policy": "off"},
    )


def step_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Keys stepped per second: the daemon's resident step vs the loop over keys, same batches.

    * ``batched`` (the path the daemon runs with ``drift.policy = off``): the K
      keys resident in a :class:`~fogline.daemon.stream.keycache.KeyCache`
      (rows of its key table, put there once, as the daemon's ``_load`` does on
      a key's first record); one timed call = ``KeyedUpdate.step_cached``
      (passes of ``CHUNK`` keys stepped in place in the table, a
      :class:`StepInfo` per key) + ``KeyCache.mark_dirty`` of the stepped keys.
      Not included: decoding, grouping the batch's rows by key, checkpoints.
    * ``loop``: :func:`fogline.models.keyed.keyed_step_loop`, i.e.
      ``stream_step`` per key on its own :class:`PosteriorState` (new state and
      :class:`StepInfo` per key).
    * ``state_batched`` (reported beside): :func:`fogline.models.keyed.keyed_step`,
      the batched step over per-key states that the drift loop calls.

    The three take the same steps on the same batches (warm-up untimed, then
    interleaved timed blocks); at the end the resident keys' blobs are compared
    byte for byte with the state-batched ones, and their locs with the loop's.
    """
    from fogline.daemon.stream.keycache import KeyCache
    from fogline.daemon.stream.keyed_update import KeyedUpdate

    base = fleet(args, device)
    batches = micro_batch(args, device)
    states = {k: new_key_state(base, k) for k in batches}
    holder = {"state_batched": dict(states), "loop": dict(states)}
    cache = KeyCache(max_keys=args.keys, idle_ttl_s=0)
    for k, st in states.items():
        cache.put(k, st, 0, dirty=False)
    update = KeyedUpdate(_settings(args))
    assert update.in_place

    def batched() -> None:
        infos = update.step_cached(cache, batches)
        cache.mark_dirty([k for k, info in infos.items() if not info.rejected])

    def state_batched() -> None:
        holder["state_batched"] = keyed_step(holder["state_batched"], batches)[0]

    def loop() -> None:
        holder["loop"] = keyed_step_loop(holder["loop"], batches)[0]

    paths: tuple[tuple[str, Callable[[], None]], ...] = (
        ("batched", batched),
        ("loop", loop),
        ("state_batched", state_batched),
    )
    for _ in range(args.warmup):
        for _name, fn in paths:
            fn()
    runs: dict[str, list[float]] = {name: [] for name, _ in paths}
    cpu: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _ in range(args.repeats):
        for name, fn in paths:
            wall, cpu_s = _timed(fn, device)
            runs[name].append(args.keys / wall)
            cpu[name].append(args.keys / cpu_s)
    med = {name: statistics.median(v) for name, v in runs.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    rows = sum(mb.rows for mb in batches.values())
    resident = {k: cache.get(k).state for k in batches}  # type: ignore[union-attr]
    # the loop took the same steps: its final states agree to float tolerance
    worst = max(
        float((resident[k].params["loc"] - holder["loop"][k].params["loc"]).abs().max())
        for k in batches
    )
    same_blobs = all(to_bytes(resident[k]) == to_bytes(holder["state_batched"][k]) for k in batches)
    b, lp = med["batched"], med["loop"]
    return {
        "batched_key_steps_per_s": round(b, 1),
        "loop_key_steps_per_s": round(lp, 1),
        "state_batched_key_steps_per_s": round(med["state_batched"], 1),
        "ratio": round(b / lp, 2),
        "ratio_paired_median": round(
            statistics.median(x / y for x, y in zip(runs["batched"], runs["loop"], strict=True)), 2
        ),
        "ratio_state_batched": round(med["state_batched"] / lp, 2),
        "batched_cpu_key_steps_per_s": round(med_cpu["batched"], 1),
        "loop_cpu_key_steps_per_s": round(med_cpu["loop"], 1),
        "ratio_cpu_time": round(med_cpu["batched"] / med_cpu["loop"], 2),
        "batched_us_per_key_step": round(1e6 / b, 1),
        "batched_rows_per_s": round(b * rows / args.keys),
        "rows_per_micro_batch": rows,
        "batched_runs": [round(v, 1) for v in runs["batched"]],
        "loop_runs": [round(v, 1) for v in runs["loop"]],
        "state_batched_runs": [round(v, 1) for v in runs["state_batched"]],
        "max_abs_loc_difference": worst,
        "resident_blobs_equal_state_batched": same_blobs,
        "table_row_bytes_per_key": cache.tables[0].row_bytes(),
        "table_bytes_per_key": round(table_bytes_per_key(cache.tables[0])),
        "table_capacity": cache.tables[0].capacity,
    }


def tensor_bytes(state: PosteriorState) -> int:
    """Bytes of every tensor a :class:`PosteriorState` holds."""
    tensors = [
        *state.params.values(),
        *state.opt_state.values(),
        state.prior.loc,
        state.prior.scale,
        state.rng_state,
        *state.aux.values(),
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def unique_storage_bytes(states: list[PosteriorState]) -> int:
    """Bytes of the distinct tensor storages the ``states`` hold (shared ones counted once).

    Keys started from one fleet prior share its prior tensors until a policy
    swaps a key's prior; this is what K states occupy, divided by K below.
    """
    seen: dict[int, int] = {}
    for st in states:
        for t in (
            *st.params.values(),
            *st.opt_state.values(),
            st.prior.loc,
            st.prior.scale,
            st.rng_state,
            *st.aux.values(),
        ):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def memory_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Bytes of state per key: tensors, blob, with the drift state, and resident growth."""
    from fogline.drift.config import PolicyConfig
    from fogline.drift.keyed import KeyedDriftLoop
    from fogline.drift.runner import store_drift

    base = fleet(args, device)
    batches = micro_batch(args, device)
    states = keyed_step({k: new_key_state(base, k) for k in batches}, batches)[0]
    one = next(iter(states.values()))
    policy = PolicyConfig(policy="forget", ensemble_size=args.ensemble_size)
    loop = KeyedDriftLoop(policy, base_lr=one.lr, data_size=None)
    drift = loop.drift_for(one)
    with_drift = store_drift(one, drift)
    ref = drift.reference
    ens_bytes = sum(t.numel() * t.element_size() for pair in ref.ensemble.layers for t in pair)
    ref_bytes = ens_bytes + sum(t.numel() * t.element_size() for t in (ref.loc, ref.scale))
    return {
        "state_tensor_bytes_per_key": tensor_bytes(one),
        "blob_bytes_per_key": len(to_bytes(one)),
        "with_drift_tensor_bytes_per_key": tensor_bytes(with_drift) + ref_bytes,
        "with_drift_blob_bytes_per_key": len(to_bytes(with_drift)),
        "drift_reference_ensemble_bytes": ens_bytes,
        "unique_storage_bytes_per_key": round(
            unique_storage_bytes(list(states.values())) / max(1, len(states))
        ),
        "num_weights": one.num_weights,
    }


# ----------------------------------------------------------------------------- daemon part
def daemon_part(args: argparse.Namespace) -> dict[str, Any]:
    """Records/s of the keyed daemon vs a bare consume + decode loop (:mod:`.keyed_daemon`)."""
    from fogline.bench.keyed_daemon import daemon_part as keyed_daemon_part

    return keyed_daemon_part(
        keys=args.keys,
        rows_per_key=args.rows,
        hidden=(args.hidden,) * args.layers,
        source_process=not args.no_source_process,
        policies=tuple(p.strip() for p in args.drift.split(",") if p.strip()),
        batches=args.daemon_batches,
    )


def _under_daemon_gc(
    part: Callable[[argparse.Namespace, torch.device], dict[str, Any]],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """``part`` under the collector settings ``fogline run`` uses (both timed paths alike).

    The daemon calls :func:`fogline.daemon.gc_tuning.tune_for_streaming` after
    start-up; without it CPython's default thresholds put a cyclic-collector pass
    into the timed blocks every 700 allocations (measured: ~20 % of the resident
    step at 1,000 keys).  The previous settings are restored afterwards
    (:func:`~fogline.daemon.gc_tuning.streaming_gc`); ``gc_thresholds`` in the
    record says what was timed.
    """
    import gc

    from fogline.daemon.gc_tuning import streaming_gc

    with streaming_gc():
        out = part(args, device)
        out["gc_thresholds"] = list(gc.get_threshold())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part; returns the result record."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    record: dict[str, Any] = {"benchmark": "keyed"}
    if not args.skip_step:
        record.update(_under_daemon_gc(step_part, args, device))
        record.update(memory_part(args, device))
    if not args.skip_daemon:
        record.update(daemon_part(args))
    record.update(
        {
            "keys": args.keys,
            "rows": args.rows,
            "hidden": args.hidden,
            "layers": args.layers,
            "in_features": args.in_features,
            "guide": args.guide,
            "functional_prior": bool(args.functional_prior),
            "threads": args.threads,
            "device": args.device,
            "repeats": args.repeats,
            "statistic": "median",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }
    )
    return record


def main(argv: list[str]) -> int:
    """Entry point of ``fogline bench keyed``."""
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "fogline bench keyed: --device cuda needs a CUDA build of torch and a visible GPU",
            file=sys.stderr,
        )
        return 2
    if min(args.keys, args.rows, args.hidden, args.layers, args.repeats, args.daemon_batches) < 1:
        print("fogline bench keyed: sizes and repeats must be >= 1", file=sys.stderr)
        return 2
    rec = run(args)
    if args.skip_step:
        if "daemon_ratio" in rec:
            print(_daemon_line(rec))
        if args.json:
            print(json.dumps(rec, sort_keys=True))
        return 0
    print(
        f"keyed bench  keys={rec['keys']}  rows/key~{rec['rows']}  "
        f"hidden={rec['layers']}x{rec['hidden']}  guide={rec['guide']}  "
        f"threads={rec['threads']}  device={rec['device']}"
    )
    print(f"  resident (daemon) step:  {rec['batched_key_steps_per_s']:10.1f} key-steps/s")
    print(f"  keyed_step over states:  {rec['state_batched_key_steps_per_s']:10.1f} key-steps/s")
    print(f"  loop of stream_step:     {rec['loop_key_steps_per_s']:10.1f} key-steps/s")
    print(f"  ratio batched / loop:    {rec['ratio']:10.2f}x  (medians of {rec['repeats']} blocks)")
    print(f"  ratio in CPU time:       {rec['ratio_cpu_time']:10.2f}x")
    print(
        f"  memory per key: {rec['state_tensor_bytes_per_key']:,} B tensors, "
        f"{rec['blob_bytes_per_key']:,} B blob; with drift "
        f"{rec['with_drift_tensor_bytes_per_key']:,} B tensors, "
        f"{rec['with_drift_blob_bytes_per_key']:,} B blob; "
        f"distinct storage over all keys {rec['unique_storage_bytes_per_key']:,} B/key"
    )
    if "daemon_ratio" in rec:
        print(_daemon_line(rec))
    if args.json:
        print(json.dumps(rec, sort_keys=True))
    return 0


def _daemon_line(rec: dict[str, Any]) -> str:
    """The daemon part in one line: each policy's records/s and ratio to the baseline."""
    parts = [
        f"{p} {rec[f'keyed_{p}_records_per_s']:,.0f} rec/s ({rec[f'daemon_{p}_ratio']:.2f}x)"
        for p in rec["daemon_policies"]
    ]
    return f"  daemon vs consume+decode {rec['baseline_records_per_s']:,.0f} rec/s: " + ", ".join(
        parts
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
