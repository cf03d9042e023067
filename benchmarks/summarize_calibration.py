"""One line per point of the calibration-source sweeps (benchmarks/calibration_sources.sh): method, format,
calibration source and samples, WikiText-2 valid and pycode perplexity, ARC-Easy and PIQA acc / acc_norm, seconds.

    python benchmarks/summarize_calibration.py PARENT_DIR     # every PARENT_DIR/*/runs/*.json
"""

import glob
import json
import sys

METRICS = ("ppl/wikitext2:valid", "ppl/pycode", "task/arc_easy/acc", "task/arc_easy/acc_norm", "task/piqa/acc",
           "task/piqa/acc_norm")


def row(record: dict) -> tuple:
    m, q = record["metrics"], record["quant"]
    calib = (record["data"].get("calib") or {})
    source = json.dumps(calib.get("corpus")) if calib else ""
    phases = record.get("phases_s") or {}
    return (q["method"], q.get("bits"), q.get("group_size"), source, calib.get("n_samples", ""),
            *(m.get(k) for k in METRICS), phases.get("calibration"), phases.get("quantize"), record["duration_s"])


def main() -> None:
    rows = []
    for path in sorted(glob.glob(sys.argv[1] + "/*/runs/*.json")):
        record = json.load(open(path))
        if record["status"] != "ok":
            print("FAILED", path, record.get("error"))
            continue
        rows.append(row(record))
    print("method | bits | group | calib | samples | " + " | ".join(METRICS) + " | calib s | quantize s | point s")
    for r in sorted(rows, key=str):
        print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r))


if __name__ == "__main__":
    main()
