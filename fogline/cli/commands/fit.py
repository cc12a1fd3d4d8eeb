"""``fogline warmstart --config CFG --data PATH``: the generic warm start's CLI side.

Not a command module of its own: :mod:`fogline.cli.commands.model` registers
``fogline warmstart`` and hands the ``--config`` and ``--write-recipe-data``
cases here.  Bad data or a bad config exits 2 with one clear message on stderr;
with ``--json`` the report is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_STATE = "fogline-out/warmstart/state.safetensors"


def _fail(message: str) -> int:
    print(f"fogline warmstart: {message}", file=sys.stderr)
    return 2


def warmstart_config(args: argparse.Namespace) -> int:
    """Load CFG's model spec and the data, fit, save the state, write the report."""
    import torch

    from fogline.cli.commands.model import _progress
    from fogline.daemon.config import ConfigError, Settings
    from fogline.models.fit import FitError, FitOptions, epochs_for, fit
    from fogline.models.report import write_figures
    from fogline.models.schema import SchemaError
    from fogline.models.serialize import save
    from fogline.models.tabular import TableError, load_table

    defaults: dict[str, Any] = args.spec_flag_defaults
    clash = [d for d, v in defaults.items() if getattr(args, d) != v]
    if clash:
        flags = ", ".join("--" + d.replace("_", "-") for d in clash)
        return _fail(f"{flags}: with --config the [model] section sets these (model.<field>)")
    if bool(args.data) == bool(args.topic):
        return _fail(
            "--config needs one of --data PATH (a .csv, .jsonl or .parquet history) "
            "or --topic T (a Kafka topic's retained history)"
        )
    if args.until and not args.topic:
        return _fail("--until needs --topic")
    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    spec = settings.model
    if spec is None:
        return _fail(
            f"{args.config}: no [model] section (features, target, ...); "
            "see examples/california.toml"
        )
    torch.set_num_threads(args.threads)
    try:
        options = FitOptions(
            epochs=args.epochs,
            lr=args.lr,
            batch=args.batch,
            seed=args.seed,
            samples=args.samples,
            particles=args.particles,
            cov_factor_lr_scale=args.cov_factor_lr_scale,
        )
        if args.topic:
            table, loaded = _topic_table(args, settings, spec)
        else:
            table, loaded = load_table(args.data, spec, drop_invalid=args.drop_invalid)
        epochs = epochs_for(table.rows, options)
        quiet = args.quiet or args.json or not sys.stderr.isatty()
        with _progress(epochs, quiet) as on_epoch:
            result = fit(spec, table, options, on_epoch)
    except (TableError, SchemaError, FitError, ValueError) as exc:
        return _fail(str(exc))
    alarm = None if args.no_alarm_reference else _alarm_reference(result, settings, args)
    out = Path(args.out or DEFAULT_STATE)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(result.state, str(out))
    report_dir = Path(args.report_dir) if args.report_dir else out.parent
    files = {"state": str(out)}
    files.update(
        write_figures(
            result.ensemble,
            result.schema,
            result.report,
            result.x_train,
            result.y_train,
            report_dir,
            margin=spec.functional_prior.margin,
        )
    )
    files["report"] = str(report_dir / "report.json")
    report = {**result.report, "data": loaded.to_json(), "files": files}
    if alarm is not None:
        report["alarm_reference"] = alarm
    Path(files["report"]).write_text(json.dumps(report, indent=1, sort_keys=True))
    for line in summary_lines(report):
        print(line)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0


def _alarm_reference(result: Any, settings: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """Store the fit's holdout (model units) as the drift alarm's reference (``drift/history.py``).

    Fitted for the config's drift settings, ``--alarm-batch-size`` and
    ``stream.seed``; on failure a warning is printed and the daemon will
    calibrate on the stream instead.
    """
    from fogline.drift.history import alarm_summary, calibrate_from_history

    try:
        result.state = calibrate_from_history(
            result.state,
            result.x_held,
            result.y_held,
            settings.drift,
            batch_size=args.alarm_batch_size,
            seed=settings.stream.seed,
            source="warm-start holdout",
        )
    except (ValueError, RuntimeError) as exc:
        print(f"fogline warmstart: no alarm reference stored ({exc})", file=sys.stderr)
        return None
    return alarm_summary(result.state)


def parse_until(text: str) -> tuple[int | None, int | None]:
    """``--until``: (timestamp ms, None) or (None, offset).

    An integer below 1e9 is an offset (exclusive, per partition); anything
    else is a time: an ISO-8601 string or an epoch number (seconds below
    1e11, else ms).
    """
    from fogline.models.tabular import RowError, timestamp_ms

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is not None and 0 <= value < 1_000_000_000:
        return None, value
    try:
        return timestamp_ms(text), None
    except RowError as exc:
        raise ValueError(f"--until {text!r}: {exc.detail}") from None


def _topic_table(args: argparse.Namespace, settings: Any, spec: Any) -> Any:
    """Read ``--topic``'s history (bounded by ``--until``) into a table."""
    from fogline.daemon.stream.source import read_history, security_kwargs
    from fogline.models.tabular import TableError, records_table

    until_ts, until_offset = parse_until(args.until) if args.until else (None, None)
    bootstrap = args.bootstrap or settings.kafka.bootstrap_servers
    try:
        raws = read_history(
            bootstrap,
            args.topic,
            until_ts_ms=until_ts,
            until_offset=until_offset,
            **security_kwargs(settings.kafka),
        )
    except Exception as exc:  # kafka-python's NoBrokersAvailable, KafkaError, ...
        raise TableError(
            f"topic {args.topic} at {bootstrap}: {type(exc).__name__}: {exc}"
        ) from None
    if not raws:
        raise TableError(f"topic {args.topic} at {bootstrap}: no records (or no such topic)")
    records = ((f"{r.topic}:{r.partition}@{r.offset}", r.value, r.timestamp_ms) for r in raws)
    return records_table(records, spec, args.drop_invalid, source=f"topic {args.topic}")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines of a generic warm start's report."""
    h, f, d = report["holdout"], report["fit"], report["data"]
    lines = [
        f"warm start on {d['source']}: {d['rows_kept']} rows "
        f"({d['rows_dropped']} dropped {d['dropped'] or ''}), "
        f"train {report['train']['n']} / holdout {h['n']} ({report['train']['split']}), "
        f"{f['epochs']} epochs in {f['seconds']:.1f} s"
    ]
    if "accuracy" in h:
        lines.append(
            f"  holdout nll {h['nll']:.4f}  accuracy {h['accuracy']:.3f}  "
            f"brier {h['brier']:.4f}  ece {h['ece']:.3f}"
        )
    else:
        lines.append(
            f"  holdout nll {h['nll']:.4f}  rmse {h['rmse']:.4g} (target sd {h['y_sd']:.4g})  "
            f"coverage 50/90/95 {h['coverage_50']:.3f}/{h['coverage_90']:.3f}/"
            f"{h['coverage_95']:.3f}"
        )
    lines += [f"  {kind:<12} {path}" for kind, path in report["files"].items()]
    return lines


def write_recipe_data(args: argparse.Namespace) -> int:
    """``--write-recipe-data FILE``: the recipe's rows as a CSV for the California preset."""
    from fogline.models.data import DataUnavailableError, load, write_recipe_csv

    try:
        table = load(args.data)
    except DataUnavailableError as exc:
        return _fail(str(exc))
    n = write_recipe_csv(args.write_recipe_data, table, seed=args.seed)
    print(f"wrote {n} rows (8 raw features + y) to {args.write_recipe_data}")
    return 0
