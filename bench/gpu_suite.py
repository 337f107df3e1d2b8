"""Every speed benchmark of the project in one run on a GPU: one JSON, one table (issue 23).

    git -C <vilbert-multi-task git dir> archive HEAD vilbert/vilbert.py vilbert/utils.py \\
        vilbert/datasets/_image_features_reader.py vilbert/datasets/vqa_dataset.py | tar -x -C /tmp/ref
    pip install lmdb                    # the reference's feature reader, for the input-pipeline comparison
    PYTHONPATH=. python bench/gpu_suite.py --reference /tmp/ref --out gpu_suite.json
    PYTHONPATH=. python bench/gpu_suite.py --smoke           # CPU, tiny sizes, seconds (tests/bench runs it)

The runs, at the reference's batch sizes (pretraining 64 at text 36 / 37 regions, VQA 128 at 23 / 101), fp32 and
bf16 autocast, in this order: `train_step.py` (our steps, base preset), `reference_speed.py` (ours against
vilbert-multi-task at fixed shapes), `realistic_speed.py` (at realistic lengths, eager and compiled),
`input_pipeline.py` (our loader against the reference's), `extract.py` (BUTD R101-C4 and VMB X152-FPN, random
weights, 600-pixel images, batch 8). Each runs in this process with its own arguments; its printed output, its
wall time and whether it finished go into the JSON, and the table shows one line per run (its last summary
lines). Runs that need the reference checkout are skipped without `--reference`. The whole suite is sized to
finish in under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def runs(reference: str | None, smoke: bool) -> list[tuple[str, str, list[str], bool]]:
    """(name, script, arguments, needs the reference) of every run; `smoke`: CPU, tiny presets, a step or two."""
    if smoke:
        return [
            ("train_step tiny fp32", "train_step.py",
             ["--device", "cpu", "--preset", "tiny", "--batch-scale", "0.03", "--steps", "1", "--warmup", "0",
              "--precisions", "fp32", "--workers", "0"], False),
            ("extract butd tiny", "extract.py",
             ["--only", "extract", "--detector", "butd-r101-c4", "--option", "preset=tiny", "--images", "2",
              "--size", "64", "--batch-size", "2", "--workers", "0", "--forward-repeats", "1"], False),
            ("extract vmb tiny", "extract.py",
             ["--only", "extract", "--detector", "vmb-x152-fpn", "--option", "preset=tiny", "--images", "2",
              "--size", "64", "--batch-size", "2", "--workers", "0", "--forward-repeats", "1"], False),
            ("realistic_speed tiny", "realistic_speed.py",
             [str(reference), "--preset", "tiny", "--samples", "8", "--batch", "4", "--rounds", "1",
              "--workloads", "vqa-adaptive"], True),
        ]
    ref = [str(reference)]
    listed = [("train_step", "train_step.py", ["--device", "cuda", "--steps", "10", "--warmup", "3",
                                               "--precisions", "fp32,bf16", "--workers", "8"], False)]
    for precision in ("fp32", "bf16"):
        listed.append((f"reference_speed {precision}", "reference_speed.py",
                       [*ref, "--device", "cuda", "--batch", "0", "--precision", precision, "--timed", "5",
                        "--rounds", "2"], True))
    for precision, batch in (("fp32", "64"), ("bf16", "128")):
        listed.append((f"realistic_speed {precision}", "realistic_speed.py",
                       [*ref, "--device", "cuda", "--precision", precision, "--batch", batch, "--samples", "1024",
                        "--window", "16", "--compile"], True))
    listed.append(("input_pipeline", "input_pipeline.py", ["--reference", *ref, "--workers", "0,2,8"], True))
    for detector in ("butd-r101-c4", "vmb-x152-fpn"):
        listed.append((f"extract {detector} bf16", "extract.py",
                       ["--only", "extract", "--detector", detector, "--device", "cuda", "--precision", "bf16",
                        "--images", "64", "--size", "600", "--batch-size", "8", "--workers", "8"], False))
    return listed


def run_script(script: str, arguments: list[str]) -> tuple[bool, str]:
    """Run bench/SCRIPT's main() with `arguments` in this process; (finished, what it printed)."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    output = io.StringIO()
    argv = sys.argv
    sys.argv = [script, *arguments]
    try:
        with contextlib.redirect_stdout(output):
            spec.loader.exec_module(module)
            module.main()
        return True, output.getvalue()
    except (Exception, SystemExit):  # one failed run is reported, the suite goes on
        return False, output.getvalue() + traceback.format_exc()
    finally:
        sys.argv = argv


def summary(output: str, lines: int = 3) -> str:
    kept = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(("USDT", "  "))]
    return " / ".join(kept[-lines:])[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="directory holding vilbert-multi-task's vilbert/ (vilbert.py, datasets/)")
    parser.add_argument("--out", type=Path, default=Path("gpu_suite.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks that every run still works")
    parser.add_argument("--only", help="comma-separated run names to keep (prefix match)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU"
    results = {"device": device, "torch": torch.__version__, "smoke": args.smoke, "runs": []}
    started = time.perf_counter()
    for name, script, arguments, needs_reference in runs(args.reference, args.smoke):
        if args.only and not any(name.startswith(prefix) for prefix in args.only.split(",")):
            continue
        entry = {"name": name, "command": f"python bench/{script} {' '.join(arguments)}"}
        if needs_reference and not args.reference:
            entry.update(finished=False, seconds=0.0, output="skipped: needs --reference")
        else:
            start = time.perf_counter()
            finished, output = run_script(script, arguments)
            entry.update(finished=finished, seconds=round(time.perf_counter() - start, 1), output=output)
        results["runs"].append(entry)
        print(f"{name}: {'done' if entry['finished'] else 'FAILED' if entry['seconds'] else 'skipped'} "
              f"in {entry['seconds']:.0f} s", file=sys.stderr, flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"device {device}, torch {torch.__version__}, {results['seconds']:.0f} s in all; JSON: {args.out}\n")
    print("| run | seconds | finished | last lines |")
    print("|---|---|---|---|")
    for entry in results["runs"]:
        print(f"| {entry['name']} | {entry['seconds']:.0f} | {'yes' if entry['finished'] else 'no'} "
              f"| {summary(entry['output'])} |")
    failed = [e["name"] for e in results["runs"] if not e["finished"] and e["seconds"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
