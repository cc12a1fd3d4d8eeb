"""``fogline demo``: the whole daemon on one machine, nothing started by hand.

1. start an embedded Tansu broker and a redis-server on free loopback ports;
2. warm-start: the generic fit (:func:`fogline.models.fit.fit`, standardised
   inputs, functional prior on every feature) on regime-0 synthetic data
   (:func:`fogline.replay_data.generator.generate` ``stable``), saved as the
   ``--init`` state;
3. replay a stream with a regime shift (``--scenario``, default ``abrupt``)
   into the telemetry topic, with a few malformed records mixed in;
4. run the daemon (:class:`fogline.daemon.stream.pipeline.Pipeline`) in this process with a
   live ``rich`` progress line (records/s, loss, KL, snapshot version);
5. print a summary (drift alarms included) and write ``loss.png`` (loss, KL,
   alarm signal with its calibrated threshold and the policy's modes) and
   ``summary.json`` to ``--out``;
6. start the query service (:class:`~fogline.daemon.query.background.BackgroundServer`,
   real HTTP on a loopback port) on the live snapshot, print predictions with
   credible intervals (epistemic and aleatoric sd apart) for an in-range and an
   out-of-range input, and write ``bands.png``: the 95 % band along x0 with
   its epistemic part, as the service answers it.

The drift policy is ``--policy`` (default ``forget``); its alarm threshold is
calibrated on the warm start's holdout (``drift.calibration = history``), so
it can alarm from the first batch; the ``abrupt`` scenario shifts at batch
``--batches / 3``.

Ctrl-C stops the daemon after its current step (final snapshot written);
the embedded broker and redis-server are stopped on the way out (and die
with this process in any case).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any


def main(args: argparse.Namespace) -> int:
    """Run the demo; return an exit status."""
    import torch
    from rich.console import Console

    from fogline.daemon import logs
    from fogline.daemon.config import Settings
    from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis
    from fogline.daemon.names import dlq_topic_for
    from fogline.daemon.stream.runtime import StopFlag
    from fogline.daemon.stream.source import ReplayProducer, create_topic, read_topic
    from fogline.daemon.stream.store import SnapshotStore
    from fogline.drift.config import PolicyConfig
    from fogline.drift.history import calibrate_from_history
    from fogline.drift.runner import drift_summary
    from fogline.models.fit import FitOptions, fit
    from fogline.models.serialize import save
    from fogline.models.spec import ModelSpec
    from fogline.models.tabular import Table
    from fogline.replay_data.generator import generate, record_lines

    console = Console()
    batch_size = args.batch_size or 64
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs.configure("json", "ERROR")
    torch.set_num_threads(1)
    stop = StopFlag().install()
    try:
        with console.status("starting the embedded broker and redis-server"):
            kafka = EmbeddedKafka().start()
            redis = EmbeddedRedis().start()
        console.print(f"broker {kafka.bootstrap_servers}, redis {redis.url}")
        try:
            with console.status("warm start: SVI fit on regime-0 data (functional prior on)"):
                warm = generate("stable", seed=args.seed + 1, n_batches=40, batch_size=64)
                spec = ModelSpec()  # the synthetic stream's shape (examples/synthetic.toml)
                table = Table(
                    torch.from_numpy(warm.x).double(),
                    torch.from_numpy(warm.y).double(),
                    None,
                    None,
                    "replay_data stable",
                )
                res = fit(spec, table, FitOptions(epochs=args.warm_epochs, seed=0))
                # the holdout is the alarm's reference: the daemon can alarm from batch 1
                state = calibrate_from_history(
                    res.state,
                    res.x_held,
                    res.y_held,
                    PolicyConfig(policy=args.policy),
                    batch_size=batch_size,
                    seed=0,
                )
                init_path = out / "init.safetensors"
                save(state, str(init_path))
            hold = res.report["holdout"]
            console.print(
                f"warm start: holdout nll {hold['nll']:.3f}, coverage_95 {hold['coverage_95']:.3f}"
            )

            topic = f"demo-{uuid.uuid4().hex[:6]}"
            create_topic(kafka.bootstrap_servers, topic, 1)
            stream = generate(
                args.scenario, seed=args.seed, n_batches=args.batches, batch_size=batch_size
            )
            bad = 0
            with (
                console.status(f"replaying {args.scenario!r} ({stream.y.shape[0]} records)"),
                ReplayProducer(kafka.bootstrap_servers, topic) as prod,
            ):
                for i, line in enumerate(record_lines(stream)):
                    if i % 500 == 250:
                        prod.send(b'{"ts": 1, "x": "broken"}')
                        bad += 1
                    prod.send(line.encode())
                    if args.speed > 0:
                        time.sleep(1.0 / args.speed)
            console.print(
                f"replayed {stream.y.shape[0]} records (+{bad} malformed), change at batches "
                f"{list(stream.change_batches)}"
            )

            settings = Settings.load(
                None,
                model_name="demo",
                metrics_port=0,
                kafka={
                    "bootstrap_servers": kafka.bootstrap_servers,
                    "topic": topic,
                    "group_id": "demo",
                    "session_timeout_ms": 6000,
                },
                redis={"url": redis.url},
                stream={
                    "batch_size": batch_size,
                    "batching": "count",
                    "steps_per_batch": 5,
                    "data_size": 5000,
                    "snapshot_every_batches": 10,
                    "snapshot_every_seconds": 2,
                    "lr": 5e-3,
                    "device": "auto",
                },
                drift={"policy": args.policy},
            )
            t_start = time.perf_counter()
            pipe, code, history = run_live(console, settings, init_path, stop, args.scenario)
            meta = SnapshotStore(redis.url, "demo").read_meta()
            dlq = read_topic(kafka.bootstrap_servers, dlq_topic_for(topic), timeout_s=10)
            ps = drift_summary(pipe.state) if pipe.state else {}
            alarm_batches = [
                t["batch"] for t in ps.get("transitions", []) if t["reason"] == "alarm"
            ]
            summary = {
                "exit": code,
                "policy": args.policy,
                "drift_mode": ps.get("mode"),
                "alarm_batches": alarm_batches,
                "alarm_threshold": ps.get("threshold"),
                "scenario": args.scenario,
                "records_sent": int(stream.y.shape[0]) + bad,
                "records_absorbed": meta.records_absorbed,
                "dead_lettered": len(dlq),
                "snapshot_version": meta.version,
                "batches": pipe.stats.batches,
                "change_batches": list(stream.change_batches),
                "final_loss": pipe.stats.last_loss,
                "seconds": round(time.perf_counter() - t_start, 2),
            }
            _plot(history, list(stream.change_batches), out / "loss.png")
            console.print_json(json.dumps(summary))
            base = [0.0] * stream.x.shape[1]
            summary["query"] = query_step(
                console, settings, base, feature=0, inside=0.0, outside=6.0, path=out / "bands.png"
            )
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            console.print(f"plots and summary in {out}/")
            return code
        finally:
            kafka.close()
            redis.close()
    finally:
        stop.restore()


def run_live(
    console: Any, settings: Any, init_path: Path, stop: Any, title: str
) -> tuple[Any, int, list[dict[str, Any]]]:
    """Run the daemon in this process until the topic is drained, with a live rich table.

    Returns the pipeline, its exit status and one history row per batch
    (loss, KL, alarm signal, threshold, drift mode).
    """
    from rich.live import Live
    from rich.table import Table

    from fogline.daemon.stream.pipeline import Pipeline, RunOptions, RunStats
    from fogline.drift.policy import threshold_value
    from fogline.drift.runner import drift_summary
    from fogline.models.state import PosteriorState

    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def table(stats: RunStats, absorbed: int, mode: str, alarms: int) -> Table:
        dt = max(1e-9, time.perf_counter() - t_start)
        t = Table(title=f"fogline demo — {title}")
        cols = ("records/s", "absorbed", "batches", "loss", "KL", "snapshot", "DLQ")
        for col in (*cols, "drift mode", "alarms"):
            t.add_column(col)
        t.add_row(
            f"{absorbed / dt:,.0f}",
            str(absorbed),
            str(stats.batches),
            f"{stats.last_loss:.4f}",
            f"{stats.last_kl:.1f}",
            str(stats.last_version),
            str(stats.dead_lettered),
            mode,
            str(alarms),
        )
        return t

    with Live(console=console, refresh_per_second=8) as live:

        def on_batch(stats: RunStats, st: PosteriorState) -> None:
            ps = drift_summary(st)
            mode = str(ps.get("mode", "off"))
            if ps.get("calibrating", 0) and mode == "stable":
                mode = "calibrating"
            history.append(
                {
                    "batch": stats.batches,
                    "loss": stats.last_loss,
                    "kl": stats.last_kl,
                    "signal": stats.last_signals.get("alarm_signal", math.nan),
                    "threshold": threshold_value(ps.get("threshold")),
                    "mode": mode,
                }
            )
            live.update(table(stats, st.records_absorbed, mode, int(ps.get("alarms", 0))))

        pipe = Pipeline(
            settings, RunOptions(init_path=init_path, idle_exit_s=3.0, on_batch=on_batch), stop
        )
        code = pipe.run()
    return pipe, code, history


def query_step(
    console: Any,
    settings: Any,
    base: list[float],
    *,
    feature: int,
    inside: float,
    outside: float,
    path: Path,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Ask the query service (started here on the live snapshot) what it believes.

    Predicts ``base`` with feature ``feature`` set to ``inside`` (in the
    data) and to ``outside`` (beyond it), prints both with their 95 %
    intervals and epistemic / aleatoric sd, and writes the band along that
    feature (from ``inside - 2 |outside - inside|`` to ``outside``, 161
    points) to ``path``.  Rows are sent as objects by name when ``names`` is
    given (raw units), else as lists in model order.  Returns the two answers.
    """
    from rich.table import Table

    from fogline.daemon.query.background import BackgroundServer, request_json, wait_for_snapshot

    model = settings.model_name
    span = abs(outside - inside)
    lo = inside - 2 * span if outside > inside else outside
    hi = outside if outside > inside else inside + 2 * span
    grid = [lo + (hi - lo) * i / 160 for i in range(161)]

    def row(v: float) -> Any:
        r = list(base)
        r[feature] = v
        return dict(zip(names, r, strict=True)) if names else r

    with BackgroundServer(settings) as url:
        wait_for_snapshot(url, model)
        ask = request_json(
            f"{url}/v1/models/{model}/predict",
            {"rows": [row(inside), row(outside)], "levels": [0.95]},
        )
        sweep = request_json(
            f"{url}/v1/models/{model}/predict", {"rows": [row(v) for v in grid], "levels": [0.95]}
        )
    label = names[feature] if names else f"x{feature}"
    t = Table(title=f"query service, snapshot v{ask['snapshot_version']} ({url})")
    for col in ("input", "mean", "95% interval", "epistemic sd", "aleatoric sd"):
        t.add_column(col)
    answers: dict[str, Any] = {}
    for tag, v, p in zip(
        ("in range", "out of range"), (inside, outside), ask["predictions"], strict=True
    ):
        lo95, hi95 = p["intervals"]["0.95"]
        t.add_row(
            f"{tag}: {label}={v:g}",
            f"{p['mean']:.3f}",
            f"[{lo95:.3f}, {hi95:.3f}]",
            f"{p['epistemic_std']:.3f}",
            f"{p['aleatoric_std']:.3f}",
        )
        answers[tag.replace(" ", "_")] = {"input": row(v), **p}
    console.print(t)
    _plot_band(grid, sweep["predictions"], label, (inside, outside), path)
    console.print(f"band plot: {path}")
    return answers


def _plot_band(
    grid: list[float],
    preds: list[dict[str, Any]],
    label: str,
    marks: tuple[float, float],
    path: Path,
) -> None:
    """The 95 % band and its epistemic part (mean ± 1.96 epistemic sd) along one input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = [p["mean"] for p in preds]
    lo = [p["intervals"]["0.95"][0] for p in preds]
    hi = [p["intervals"]["0.95"][1] for p in preds]
    ep = [1.959963984540054 * p["epistemic_std"] for p in preds]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.3, label="95% credible band")
    ax.fill_between(
        grid,
        [m - e for m, e in zip(mean, ep, strict=True)],
        [m + e for m, e in zip(mean, ep, strict=True)],
        color="tab:orange",
        alpha=0.4,
        label="epistemic part (±1.96 sd)",
    )
    ax.plot(grid, mean, color="tab:blue", lw=1.5, label="predictive mean")
    for v, name in zip(marks, ("in range", "out of range"), strict=True):
        ax.axvline(v, color="grey", ls=":", lw=1)
        ax.annotate(name, (v, ax.get_ylim()[1]), fontsize=8, ha="center", va="top")
    ax.set_xlabel(f"{label} (other inputs fixed)")
    ax.set_ylabel("prediction")
    ax.set_title("the live posterior, as the query service answers", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(history: list[dict[str, Any]], changes: list[int], path: Path) -> None:
    """Loss, KL to the prior, and the alarm signal with its threshold and the policy mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    b = [h["batch"] for h in history]
    a1.plot(b, [h["loss"] for h in history], lw=0.8)
    a1.set_ylabel("loss (neg. ELBO / obs)")
    a2.plot(b, [h["kl"] for h in history], lw=0.8, color="tab:orange")
    a2.set_ylabel("KL(q || current prior)")
    a3.plot(b, [h["signal"] for h in history], lw=0.8, color="tab:green", label="surprisal")
    a3.plot(b, [h["threshold"] for h in history], lw=0.8, color="k", ls=":", label="threshold")
    a3.set_yscale("symlog")
    a3.set_ylabel("alarm signal")
    colours = {"shifted": "tab:red", "recovering": "tab:orange", "calibrating": "0.8"}
    for h in history:
        if h["mode"] in colours:
            a3.axvspan(
                h["batch"] - 0.5, h["batch"] + 0.5, color=colours[h["mode"]], alpha=0.3, lw=0
            )
    a3.legend(loc="upper left", fontsize=8)
    a3.set_xlabel("batch (shaded: calibrating grey, shifted red, recovering orange)")
    for ax in (a1, a2, a3):
        for c in changes:
            ax.axvline(c, color="k", ls="--", lw=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
