#!/usr/bin/env bash
# One command that checks qwenjax on the GPU/TPU this machine has, and prints one JSON line:
#
#   1. HF parity: tests/test_model.py -k parity_with_transformers (float32 and bfloat16 logits vs transformers;
#      "skipped" without torch + transformers)
#   2. a 20-step train of the Qwen2.5-0.5B shape (configs/qwen2.5-0.5b.yaml, model.dtype auto = bfloat16 here)
#      on a corpus built on the fly (the Python standard library, data.path null) with a tokenizer trained
#      on it: loss, tokens/s, MFU against this chip's row of the peak table
#   3. `qwenjax bench train --no-torch` (its 12.6M default shape, bfloat16 compute)
#   4. the population benchmark (`qwenjax sweep --bench-population`, every strategy incl. vmap)
#
# Usage: scripts/accelerator-check.sh [--allow-cpu] [--out DIR]
#   --allow-cpu  run on CPU too (a dry run with tiny shapes: configs/tiny.yaml, small benchmarks)
#   --out DIR    keep the run directories and logs there (default: a temporary folder)
# Environment: PYTHON (default: python). Exit status 0 when every part passed, 1 otherwise.
set -u -o pipefail

allow_cpu=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --allow-cpu) allow_cpu=1 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "accelerator-check: unknown argument $1 (use --allow-cpu, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
out="${out:-$(mktemp -d -t qwenjax-accel-XXXXXX)}"
mkdir -p "$out" || exit 2

info=$("$PY" -c 'import jax; d = jax.devices(); print(jax.default_backend(), len(d), d[0].device_kind, sep="|")' \
       2>"$out/platform.log") || { echo "accelerator-check: JAX does not start: $(tail -1 "$out/platform.log")" >&2; exit 1; }
platform=${info%%|*}
if [ "$platform" = cpu ] && [ "$allow_cpu" = 0 ]; then
  echo "accelerator-check: no GPU or TPU found (JAX sees only CPU); pass --allow-cpu for a dry run with tiny shapes" >&2
  exit 1
fi

if [ "$platform" = cpu ]; then
  train_args=(configs/tiny.yaml train.steps=20 eval.batches=1)
  bench_args=(train.batch_size=2 train.seq_len=64 model.num_hidden_layers=2 --steps 1 --rounds 1)
  pop_args=(--members 2 --bench-steps 1)
  pop_config=(train.batch_size=4 train.seq_len=64)
else
  # 0.5B shapes, bf16 compute (model.dtype auto), fsdp over every device (4 sequences each); a corpus and
  # tokenizer made here
  ndev=$(echo "$info" | cut -d'|' -f2)
  train_args=(configs/qwen2.5-0.5b.yaml model.dtype=auto train.steps=20 train.batch_size=$((4 * ndev)) train.seq_len=512
              optim.warmup_steps=2 data.path=null data.tokenizer=null data.vocab_size=4096
              data.max_bytes=4000000 data.heldout_fraction=0.01 eval.batches=2)
  bench_args=(model.dtype=bfloat16 mesh.fsdp=-1 train.batch_size=$((8 * ndev)) --steps 5 --rounds 3)
  pop_args=(--members 4 --bench-steps 5)
  pop_config=(train.batch_size=8 train.seq_len=512 model.dtype=bfloat16)
fi
common=(run_dir="$out/train" data.cache_dir="$out/cache" checkpoint.enabled=false eval.every_steps=0)

# step NAME COMMAND...: run it, log to $out/NAME.log, record status and seconds
declare -A status seconds
step() {
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then status[$name]=ok; else status[$name]=failed; fi
  seconds[$name]=$((SECONDS - t0))
}

if "$PY" -c 'import torch, transformers' 2>/dev/null; then
  step hf_parity "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py -k parity_with_transformers
else
  status[hf_parity]=skipped; seconds[hf_parity]=0
fi
step train "$PY" -m qwenjax.cli train "${train_args[@]}" "${common[@]}"
step bench_train "$PY" -m qwenjax.cli bench train --no-torch "${bench_args[@]}"
# the population benchmark reads a config file: configs/tiny.yaml with this platform's shapes
"$PY" - "$out/population.yaml" "${pop_config[@]}" <<'EOF'
import sys, yaml
from qwenjax.run_config import config_to_dict, load_config
cfg = load_config("configs/tiny.yaml", sys.argv[2:] + [f"data.cache_dir={sys.argv[1]}.cache"])
open(sys.argv[1], "w").write(yaml.safe_dump(config_to_dict(cfg)))
EOF
step population "$PY" -m qwenjax.cli sweep --bench-population "$out/population.yaml" --out "$out/population" "${pop_args[@]}"

# One JSON line from the logs and the files the steps wrote.
"$PY" - "$out" "$info" "${status[hf_parity]}" "${seconds[hf_parity]}" "${status[train]}" "${seconds[train]}" \
  "${status[bench_train]}" "${seconds[bench_train]}" "${status[population]}" "${seconds[population]}" <<'EOF'
import json, sys
from pathlib import Path

import yaml

out, info = Path(sys.argv[1]), sys.argv[2].split("|", 2)
names = ("hf_parity", "train", "bench_train", "population")
result = {"platform": info[0], "devices": int(info[1]), "device_kind": info[2], "out": str(out)}
for i, name in enumerate(names):
    result[name] = {"status": sys.argv[3 + 2 * i], "s": int(sys.argv[4 + 2 * i])}

def last_json(log):
    for line in reversed((out / log).read_text().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return {}

def tail(log):
    lines = [x for x in (out / log).read_text().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""

if result["hf_parity"]["status"] != "skipped":
    result["hf_parity"]["pytest"] = tail("hf_parity.log")
summary_file = out / "train" / "summary.json"
if summary_file.is_file():
    s = json.loads(summary_file.read_text())
    dtype = yaml.safe_load((out / "train" / "config.yaml").read_text())["model"]["dtype"]  # resolved (auto)
    result["train"].update({k: s.get(k) for k in ("n_params", "steps_completed", "initial_loss", "final_loss",
                                                  "tokens_per_s", "mfu", "peak_flops_source", "compile_s")},
                           dtype=dtype)
bench = last_json("bench_train.log")
result["bench_train"].update({k: bench.get(k) for k in ("n_params_total", "dtype", "tokens_per_s", "mfu",
                                                        "compile_s", "peak_source")})
pop_file = out / "population" / "bench_population.json"
if pop_file.is_file():
    p = json.loads(pop_file.read_text())[0]
    result["population"].update(best=p["best"], backend=p["backend"],
                                ratios={k: round(v["ratio"], 3) for k, v in p["strategies"].items()})
for name in names:
    if result[name]["status"] == "failed":
        result[name]["error"] = tail(f"{name}.log")
result["ok"] = all(result[n]["status"] in ("ok", "skipped") for n in names)
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
EOF
