#!/usr/bin/env bash
# GPU smoke: the sweep as a user runs it on a GPU with the default backend, every method × 8/4/3 bits ×
# g128/per channel, on two small random Llamas: one with kernel-friendly widths (multiples of 128) and one
# with SmolLM2-135M's 576-wide ragged shape (9 heads, 3 KV heads). Exits non-zero if a sweep exits non-zero,
# a point failed, or a quantized point ran on no GPU kernel at all.
#
# Run it on a GPU machine before you stop whenever a change touches quantizers, kernels, the sweep, model
# loading, the decoder, metrics or configs (docs/gpu.md says how, on the lent device):
#   bash benchmarks/gpu_smoke.sh            # results under $OUT/smoke (or /tmp/smoke)
set -uo pipefail
out=${OUT:-/tmp}/smoke
rm -rf "$out"; mkdir -p "$out"
status=0
start=$(date +%s)
# the ragged shape first: it exercises more kernel fallbacks, and a run cut short has tested it
for shape in "model.config.hidden_size=576 model.config.intermediate_size=1536 model.config.num_attention_heads=9 model.config.num_key_value_heads=3" \
             "model.config.hidden_size=512 model.config.intermediate_size=1536 model.config.num_attention_heads=8 model.config.num_key_value_heads=2"; do
  d="$out/$(echo "$shape" | cut -d= -f2 | cut -d' ' -f1)"
  # shellcheck disable=SC2086
  python3 -m harness sweep model=tiny-llama $shape 'quant=fp16,rtn,gptq,awq,awq_gptq' \
    quant.bits=8,4,3 quant.group_size=128,-1 eval=quick calib.n_samples=8 calib.seqlen=256 \
    out_dir="$d" >"$d.log" 2>&1 || { echo "sweep exited non-zero: $shape (log: $d.log)"; tail -5 "$d.log"; status=1; }
  python3 - "$d" <<'PY' || status=1
import json, pathlib, sys
from collections import Counter
records = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1], "runs").glob("*.json"))]
bad = [r for r in records if r.get("status") != "ok"]
kernels = Counter()
for r in records:
    kernels.update(r.get("kernels") or {})
on_gpu = [r for r in records if r["quant"]["method"] != "fp16" and not set(r.get("kernels") or {}) - {"torch"}]
print(f"{sys.argv[1]}: {len(records)} points, {len(bad)} failed; quantized layers per backend: {dict(kernels)}")
for r in bad:
    err = r.get("error") or {}
    print(f"  FAILED {r['run_id']}: {err.get('type')}: {str(err.get('message'))[:200]}")
for r in on_gpu:
    print(f"  NO GPU KERNEL {r['run_id']}: {r.get('kernels')}")
sys.exit(1 if bad or on_gpu or not records else 0)
PY
done
echo "smoke: $(( $(date +%s) - start )) s, $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
