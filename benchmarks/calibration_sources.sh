#!/usr/bin/env bash
# Calibration sources measured out of domain (issue 20's protocol): GPTQ, AWQ and AWQ+GPTQ at w4g64, w4g128 and
# w3g64, calibrated on each source, against RTN and the baseline, evaluated on WikiText-2 validation (whole),
# pycode (32 windows) and the first ITEMS items of ARC-Easy and PIQA, in their authors' layouts.
#
#   bash benchmarks/calibration_sources.sh OUT_DIR 'pydoc,pycode' [GPU]
#
# Needs MODEL (a model.name), DATA (a folder with arc_easy_test.jsonl, piqa_valid.jsonl + labels and
# wikitext2/wiki.valid.raw); ITEMS (default 500). Re-running resumes.
set -uo pipefail
out=$1 sources=$2 gpu=${3:-0}
export CUDA_VISIBLE_DEVICES=$gpu
common=(model=hf "model.name=$MODEL" eval.tasks=[] "eval.task_data={arc_easy: $DATA/arc_easy_test.jsonl, piqa: $DATA/piqa_valid.jsonl}"
        "eval.task_limit=${ITEMS:-500}" eval.adaptive=false 'eval.corpora=[wikitext2:valid,pycode]'
        "data_dirs.wikitext2=$DATA/wikitext2" 'eval.max_windows={pycode: 32}' eval.speed.repeats=2 eval.speed.warmup=1
        "out_dir=$out" "calib.corpus=$sources")
python3 -m harness sweep "${common[@]}" quant=fp16,rtn,gptq,awq,awq_gptq quant.bits=4 quant.group_size=64,128
python3 -m harness sweep "${common[@]}" quant=rtn,gptq,awq,awq_gptq quant.bits=3 quant.group_size=64
