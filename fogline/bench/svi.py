"""``fogline bench svi``: the fast streaming step against the textbook Pyro recipe.

Both paths fit the same heteroscedastic-Gaussian BNN (D inputs, ``--layers``
hidden layers of ``--hidden`` units, ReLU) to the same synthetic stream
(x ~ N(0, I), y = sin(3 x_0) + (0.1 + 0.4 |x_0|) eps) in one process, one
batch after the other, timed in interleaved blocks after a warm-up:

* ``textbook``: :class:`fogline.models.textbook.TextbookSVI` (PyroModule[nn.Linear] +
  PyroSample priors + AutoNormal + Trace_ELBO + pyro.optim.Adam) driven by
  ``SVI.step`` with Pyro's default validation (as users write it); the same
  recipe with ``pyro.enable_validation(False)`` is timed too and reported
  as ``textbook_novalidation_steps_per_s``;
* ``fast``: :func:`fogline.models.svi.step` (one flat sample site, hand-written guide,
  traced TraceMeanField ELBO, one fused Adam), one gradient step per call.

Each path reports the median over ``--repeats`` blocks of steps/s;
``ratio = fast / textbook``.  ``--json`` prints one JSON object on the last
line.  ``--device cuda`` runs both on the GPU (and reports rows/s); it fails
with exit status 2 and a clear message when CUDA is not available.
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
from typing import Any

import pyro
import torch

from fogline.models.config import ModelConfig
from fogline.models.state import Minibatch
from fogline.models.svi import init_state, step
from fogline.models.textbook import TextbookSVI, param_store_scope


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fogline bench svi", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256, help="rows per step (default 256)")
    p.add_argument("--hidden", type=int, default=32, help="width of each hidden layer")
    p.add_argument("--layers", type=int, default=2, help="number of hidden layers")
    p.add_argument("--in-features", type=int, default=8, help="input features D")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=200, help="fast-path steps per timed block")
    p.add_argument(
        "--textbook-steps",
        type=int,
        default=None,
        help="textbook steps per timed block (default: steps / 4, at least 10)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per path (median)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per path first")
    p.add_argument(
        "--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: strict fp32)"
    )
    p.add_argument(
        "--skip-novalidation",
        action="store_true",
        help="do not time the textbook recipe with validation off",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return p


def _data(n: int, d: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    noise = (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return x.to(device), (torch.sin(3 * x[:, 0]) + noise).to(device)


def _timed(fn: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """(wall-clock steps/s, thread-CPU-time steps/s) of ``steps`` calls of ``fn``.

    The wall clock is the figure; the CPU time of this thread is reported
    beside it because on a shared machine it is less disturbed by other
    processes (it means little on CUDA, where the GPU works asynchronously).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1, c1 = time.perf_counter(), time.thread_time()
    return steps / (t1 - t0), steps / max(c1 - c0, 1e-9)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure both paths; returns the result record."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    config = ModelConfig.model_validate(
        {"in_features": args.in_features, "hidden": (args.hidden,) * args.layers}
    )
    x, y = _data(args.batch, args.in_features, args.seed, device)
    batch = Minibatch(x, y)
    tb_steps = args.textbook_steps or max(10, args.steps // 4)

    state = init_state(config, seed=args.seed, device=device)
    holder = {"state": state}

    def fast() -> None:
        holder["state"], _ = step(holder["state"], batch)

    runs: dict[str, list[float]] = {"textbook": [], "textbook_novalidation": [], "fast": []}
    cpu: dict[str, list[float]] = {"textbook": [], "fast": []}
    with param_store_scope():
        pyro.enable_validation(True)  # Pyro's default, stated explicitly
        textbook = TextbookSVI(config, x, y, device=device)

        def tb() -> None:
            textbook.step(x, y)

        def tb_noval() -> None:
            with pyro.validation_enabled(False):
                textbook.step(x, y)

        for _ in range(args.warmup):
            tb()
            fast()
        for _ in range(args.repeats):
            for name, fn, n in (("textbook", tb, tb_steps), ("fast", fast, args.steps)):
                wall, cpu_rate = _timed(fn, n, device)
                runs[name].append(wall)
                cpu[name].append(cpu_rate)
            if not args.skip_novalidation:
                runs["textbook_novalidation"].append(_timed(tb_noval, tb_steps, device)[0])
    tb_med = statistics.median(runs["textbook"])
    fast_med = statistics.median(runs["fast"])
    record: dict[str, Any] = {
        "benchmark": "svi",
        "textbook_steps_per_s": round(tb_med, 1),
        "fast_steps_per_s": round(fast_med, 1),
        "ratio": round(fast_med / tb_med, 2),
        "ratio_paired_median": round(
            statistics.median(f / t for f, t in zip(runs["fast"], runs["textbook"], strict=True)),
            2,
        ),
        "textbook_rows_per_s": round(tb_med * args.batch),
        "fast_rows_per_s": round(fast_med * args.batch),
        "batch": args.batch,
        "hidden": args.hidden,
        "layers": args.layers,
        "in_features": args.in_features,
        "threads": args.threads,
        "device": args.device,
        "device_name": _device_name(device),
        "tf32": bool(args.tf32) if device.type == "cuda" else None,
        "textbook_validation": True,
        "steps": args.steps,
        "textbook_steps": tb_steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median",
        "fast_runs": [round(v, 1) for v in runs["fast"]],
        "textbook_runs": [round(v, 1) for v in runs["textbook"]],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cpu":
        tb_cpu, fast_cpu = statistics.median(cpu["textbook"]), statistics.median(cpu["fast"])
        record["textbook_cpu_steps_per_s"] = round(tb_cpu, 1)
        record["fast_cpu_steps_per_s"] = round(fast_cpu, 1)
        record["ratio_cpu_time"] = round(fast_cpu / tb_cpu, 2)
    if runs["textbook_novalidation"]:
        nv = statistics.median(runs["textbook_novalidation"])
        record["textbook_novalidation_steps_per_s"] = round(nv, 1)
        record["ratio_vs_textbook_novalidation"] = round(fast_med / nv, 2)
    final = holder["state"]
    record["fast_final_step_count"] = final.step_count
    return record


def main(argv: list[str]) -> int:
    """Entry point of ``fogline bench svi``."""
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "fogline bench svi: --device cuda needs a CUDA build of torch and a visible GPU; "
            f"this torch {torch.__version__} reports torch.cuda.is_available() == False",
            file=sys.stderr,
        )
        return 2
    if min(args.batch, args.hidden, args.layers, args.steps, args.repeats) < 1:
        print("fogline bench svi: sizes, steps and repeats must be >= 1", file=sys.stderr)
        return 2
    rec = run(args)
    nv = rec.get("textbook_novalidation_steps_per_s")
    print(
        f"svi bench  device={rec['device']} ({rec['device_name']})  batch={rec['batch']}  "
        f"hidden={rec['layers']}x{rec['hidden']}  threads={rec['threads']}  "
        f"torch {rec['torch']}  pyro {rec['pyro']}"
    )
    print(
        f"  textbook (validation on):  {rec['textbook_steps_per_s']:9.1f} steps/s  "
        f"{rec['textbook_rows_per_s']:>12,} rows/s"
    )
    if nv is not None:
        print(f"  textbook (validation off): {nv:9.1f} steps/s")
    print(
        f"  fast models.svi.step:      {rec['fast_steps_per_s']:9.1f} steps/s  "
        f"{rec['fast_rows_per_s']:>12,} rows/s"
    )
    print(
        f"  ratio fast / textbook:     {rec['ratio']:9.2f}x  (medians of {rec['repeats']} blocks)"
    )
    if args.json:
        print(json.dumps(rec, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
