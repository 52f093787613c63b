#!/usr/bin/env python3
"""Compare a criterion run of `benches/hot_paths.rs` against the committed
baseline (`benches/baseline.json`), printing the ratio per bench.

    scripts/bench-compare.sh            # short run, then compare (warns, never fails)
    scripts/bench-compare.sh --save     # short run, then write it as the new baseline

Machines differ (AVX2 EPYC vs AVX-512 IFMA Xeon) and are noisy, so besides the
raw ratio (this run's mean / the baseline's) the script prints a *calibrated*
ratio: each bench divided by the calibration bench (`hash/content_hash_300B`,
plain SHA-256 with no SIMD dispatch) of the same run, so a machine that is
uniformly faster or slower does not read as a change. A bench is flagged only
when its calibrated ratio moves past the threshold; the exit status is 0 either
way (a warning, not a gate: see README "Criterion baseline" for the threshold's
justification).
"""
import json
import os
import platform
import sys
import time

CALIBRATION = "hash/content_hash_300B"
# Two back-to-back short runs on one idle 2-core machine differed by up to
# ~15% on single benches (fsync and the 100k-key state benches the most);
# 30% leaves room for that and a busier CI neighbour while still catching a
# real regression of a hot path (a 1.5x slowdown reads as 1.5).
THRESHOLD = 0.30


def read_run(criterion_dir):
    """{bench id: mean ns} from criterion's `new/estimates.json` files."""
    out = {}
    for root, _dirs, files in os.walk(criterion_dir):
        if os.path.basename(root) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(root, "benchmark.json")) as f:
            bench_id = json.load(f)["full_id"]
        with open(os.path.join(root, "estimates.json")) as f:
            out[bench_id] = json.load(f)["mean"]["point_estimate"]
    return out


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_ns(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.0f} ns"


def main():
    args = sys.argv[1:]
    save = "--save" in args
    criterion_dir = os.environ.get("CRITERION_DIR", "target/criterion")
    baseline_path = os.environ.get("BENCH_BASELINE", "benches/baseline.json")
    run = read_run(criterion_dir)
    if not run:
        print(f"bench-compare: no criterion results under {criterion_dir}", file=sys.stderr)
        return 2
    if save:
        doc = {
            "cpu": cpu_model(),
            "date": time.strftime("%Y-%m-%d"),
            "calibration": CALIBRATION,
            "mean_ns": dict(sorted(run.items())),
        }
        with open(baseline_path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"bench-compare: wrote {len(run)} benches to {baseline_path} ({doc['cpu']})")
        return 0
    with open(baseline_path) as f:
        base = json.load(f)
    base_ns = base["mean_ns"]
    cal_now, cal_base = run.get(CALIBRATION), base_ns.get(CALIBRATION)
    print(f"baseline: {base['cpu']} ({base['date']}); this run: {cpu_model()}")
    if cal_now and cal_base:
        print(f"calibration {CALIBRATION}: {fmt_ns(cal_base)} -> {fmt_ns(cal_now)} (machine factor {cal_now / cal_base:.2f})")
    width = max(len(k) for k in list(run) + list(base_ns))
    print(f"{'bench':<{width}}  {'baseline':>10}  {'now':>10}  {'raw':>6}  {'calib':>6}")
    flagged = []
    for bench_id in sorted(set(run) | set(base_ns)):
        now, then = run.get(bench_id), base_ns.get(bench_id)
        if now is None or then is None:
            print(f"{bench_id:<{width}}  {'-' if then is None else fmt_ns(then):>10}  "
                  f"{'-' if now is None else fmt_ns(now):>10}  (only in {'baseline' if now is None else 'this run'})")
            continue
        raw = now / then
        calib = raw / (cal_now / cal_base) if cal_now and cal_base else raw
        mark = ""
        if calib > 1 + THRESHOLD:
            mark = "  SLOWER"
            flagged.append(bench_id)
        elif calib < 1 / (1 + THRESHOLD):
            mark = "  faster"
        print(f"{bench_id:<{width}}  {fmt_ns(then):>10}  {fmt_ns(now):>10}  {raw:6.2f}  {calib:6.2f}{mark}")
    if flagged:
        print(f"warning: {len(flagged)} bench(es) more than {THRESHOLD:.0%} slower than the baseline after "
              f"calibration: {', '.join(flagged)} (a warning only; rerun to rule out noise)")
    else:
        print(f"bench-compare: no bench more than {THRESHOLD:.0%} slower than the baseline after calibration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
