#!/usr/bin/env bash
# One prepared GPU check of the fast SVI step, for a session that has a CUDA device.
#
#   OUT=/some/dir bash fogline/bench/gpu_check.sh      # from the repository root
#
# 1. environment (nvidia-smi, torch/pyro versions) -> $OUT/env.txt
# 2. the CUDA unit checks (pytest -m gpu on the speed-path tests) -> $OUT/pytest_gpu.txt
# 3. `bench svi --device cuda --json` at several sizes (and one CPU run on the same
#    host for reference) -> $OUT/bench_svi_<device>_b<batch>_h<hidden>[_tf32].json
# 4. a markdown table of all runs -> $OUT/summary.md
#
# Needs a Python with a CUDA build of torch, pyro-ppl and the fogline dependencies
# ($PY, else .venv/bin/python, else python3).  Every step has its own time limit, a
# failing step is recorded and the script goes on; the whole run takes ~3-5 min.
# DRY_RUN=1 checks the script itself on a CPU-only host (tiny CPU benches, no CUDA).
set -u
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
if [ -n "${PY:-}" ]; then :
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
status=0

{
  date -u
  nvidia-smi || echo "nvidia-smi not available"
  "$PY" -c 'import torch, pyro; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-");
print("pyro", pyro.__version__)'
} >"$OUT/env.txt" 2>&1 || status=1
cat "$OUT/env.txt"

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "== DRY_RUN: tiny CPU benches only"
  "$PY" -m fogline.bench.svi --device cpu --batch 32 --hidden 8 --steps 4 --textbook-steps 2 \
    --repeats 1 --warmup 1 --json | tail -n 1 >"$OUT/bench_svi_cpu_b32_h8.json" || status=1
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch.cuda.is_available() is False with $PY; nothing to check" | tee "$OUT/error.txt"
  exit 2
fi

if [ "${DRY_RUN:-0}" != 1 ]; then
echo "== CUDA unit checks"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider --noconftest -m gpu tests/models/test_svi_speedpath.py \
  >"$OUT/pytest_gpu.txt" 2>&1 || status=1
tail -n 5 "$OUT/pytest_gpu.txt"

bench() {  # bench DEVICE BATCH HIDDEN [extra args...]
  local device=$1 batch=$2 hidden=$3
  shift 3
  local tag="${device}_b${batch}_h${hidden}"
  case " $* " in *" --tf32 "*) tag="${tag}_tf32" ;; esac
  echo "== bench svi $tag"
  if timeout 240 "$PY" -m fogline.bench.svi --device "$device" --batch "$batch" --hidden "$hidden" \
      --json "$@" >"$OUT/bench_svi_${tag}.log" 2>&1; then
    tail -n 1 "$OUT/bench_svi_${tag}.log" >"$OUT/bench_svi_${tag}.json"
    tail -n 6 "$OUT/bench_svi_${tag}.log" | head -n 5
  else
    status=1
    tail -n 20 "$OUT/bench_svi_${tag}.log"
  fi
}

common=(--repeats 5 --steps 100 --textbook-steps 20 --warmup 30 --skip-novalidation)
bench cuda 256 32 "${common[@]}"
bench cuda 4096 128 "${common[@]}"
bench cuda 16384 128 "${common[@]}"
bench cuda 16384 512 "${common[@]}"
bench cuda 16384 512 "${common[@]}" --tf32
bench cpu 256 32 --repeats 5 --steps 200 --textbook-steps 50 --warmup 30
fi

"$PY" - "$OUT" <<'PYEOF' || status=1
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| device | batch | hidden | tf32 | textbook steps/s | fast steps/s | ratio | fast rows/s |",
        "|---|---|---|---|---|---|---|---|"]
for path in sorted(out.glob("bench_svi_*.json")):
    try:
        r = json.loads(path.read_text().strip())
    except ValueError:
        continue
    rows.append(f"| {r['device']} ({r['device_name']}) | {r['batch']} | {r['layers']}x{r['hidden']} | "
                f"{r.get('tf32')} | {r['textbook_steps_per_s']} | {r['fast_steps_per_s']} | "
                f"{r['ratio']} | {r['fast_rows_per_s']:,} |")
text = "\n".join(rows) + "\n"
(out / "summary.md").write_text(text)
print(text)
PYEOF
exit $status
