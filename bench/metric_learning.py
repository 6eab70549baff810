"""Does the batch-hard triplet loss help retrieval? A controlled two-arm experiment.

    python bench/metric_learning.py --init-bundle models/vgg16-cifar10 --epochs 1 --lr 0.005

Both arms continue the same bundle for the same schedule, seed and data order; one with cross-entropy
only (`cbir train`'s default), one with `--metric-loss triplet` added. Each resulting bundle is
evaluated with the study's protocol (`cbir evaluate`: 10,000 test queries against 50,000 train
images) twice: the search vector as shipped (fused with the predicted-class one-hot) and the
embedding alone (one-hot weight 0), where a metric loss should show most. Prints a table and
writes it, with the exact commands, to `--report` (Markdown) and its JSON twin.

Training an arm is skipped when its bundle already exists, so an interrupted run can be restarted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ARMS = {"cross-entropy": [], "cross-entropy + triplet": ["--metric-loss", "triplet"]}
VECTORS = {"fused (as shipped)": [], "embedding only (w = 0)": ["--onehot-weight", "0"]}
METRICS = {"accuracy": "accuracy", "MAP@100 (trec)": "map_at_100", "P@100": "P_100", "mAP@ALL": "map_all"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-bundle", type=Path, default=Path("models/vgg16-cifar10"),
                        help="bundle both arms start from")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each arm's schedule")
    parser.add_argument("--lr", type=float, default=0.005, help="peak learning rate of each arm")
    parser.add_argument("--metric-weight", type=float, default=0.5, help="weight of the triplet loss")
    parser.add_argument("--triplet-margin", type=float, default=0.2, help="triplet margin (cosine distance)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed for both arms")
    parser.add_argument("--flip-tta", action="store_true",
                        help="embed with flip test-time augmentation (twice the inference cost)")
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="train and index at most this many images per class (quick runs)")
    parser.add_argument("--query-limit-per-class", type=int, default=None,
                        help="at most this many test queries per class (quick runs)")
    parser.add_argument("--work-dir", type=Path, default=Path("state/metric-learning"),
                        help="checkpoints, bundles and per-arm reports")
    parser.add_argument("--report", type=Path, default=Path("reports/metric-learning.md"),
                        help="Markdown table written here (and .json beside it)")
    return parser


def run(command: list[str]) -> None:
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def limits(args: argparse.Namespace, query_flag: str) -> list[str]:
    words = []
    if args.limit_per_class:
        words += ["--limit-per-class", str(args.limit_per_class)]
    if args.query_limit_per_class:
        words += [query_flag, str(args.query_limit_per_class)]
    return words


def train_command(args: argparse.Namespace, arm_dir: Path, extra: list[str]) -> list[str]:
    command = ["cbir", "train", "--init-bundle", str(args.init_bundle), "--epochs", str(args.epochs),
               "--lr", str(args.lr), "--seed", str(args.seed), "--metric-weight", str(args.metric_weight),
               "--triplet-margin", str(args.triplet_margin), "--checkpoint-dir", str(arm_dir / "checkpoint"),
               "--output", str(arm_dir / "bundle"), "--quiet", *extra, *limits(args, "--test-limit-per-class")]
    return command if args.flip_tta else [*command, "--no-flip-tta"]


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not (args.init_bundle / "bundle.json").is_file():
        print(f"error: no bundle at {args.init_bundle} (train one with `cbir train`)", file=sys.stderr)
        return 2
    cli = [sys.executable, "-m", "services.cli"]
    results: dict[str, dict[str, dict[str, float]]] = {}
    commands: list[str] = []
    for arm, extra in ARMS.items():
        arm_dir = args.work_dir / ("triplet" if extra else "ce")
        command = train_command(args, arm_dir, extra)
        commands.append(shlex.join(command))
        if not (arm_dir / "bundle" / "bundle.json").is_file():
            run([*cli, *command[1:]])
        results[arm] = {}
        for vector, options in VECTORS.items():
            name = "embedding" if options else "fused"
            evaluate = ["cbir", "evaluate", "--model-dir", str(arm_dir / "bundle"), "--output-dir",
                        str(arm_dir / "report"), "--name", name, "--cache-dir", str(args.work_dir / "cache"),
                        "--examples", "0", "--quiet", *options, *limits(args, "--query-limit-per-class")]
            commands.append(shlex.join(evaluate))
            run([*cli, *evaluate[1:]])
            metrics = json.loads((arm_dir / "report" / f"{name}.json").read_text())["metrics"]
            results[arm][vector] = {label: metrics[key] for label, key in METRICS.items()}

    lines = ["# Metric learning: cross-entropy vs cross-entropy + batch-hard triplet", "",
             f"Both arms start from `{args.init_bundle}` and train {args.epochs} epoch(s) (one-cycle, peak lr "
             f"{args.lr}, seed {args.seed}); the triplet arm adds weight {args.metric_weight}, margin "
             f"{args.triplet_margin}. Evaluation: the study's protocol (test queries against the indexed train "
             f"images, top 100), flip TTA {'on' if args.flip_tta else 'off'}"
             + (f", at most {args.limit_per_class} train images per class" if args.limit_per_class else "")
             + (f", {args.query_limit_per_class} queries per class" if args.query_limit_per_class else "")
             + ".", "",
             "| training | search vector | " + " | ".join(METRICS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for arm, by_vector in results.items():
        for vector, values in by_vector.items():
            lines.append(f"| {arm} | {vector} | " + " | ".join(
                f"{values[m]:.{5 if m.startswith('MAP') else 4}f}" for m in METRICS) + " |")
    lines += ["", "Reproduce:", "", "```", f"python bench/metric_learning.py {shlex.join(argv or sys.argv[1:])}",
              "```", "", "which runs:", "", "```", *commands, "```", ""]
    text = "\n".join(lines)
    print(text)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    args.report.with_suffix(".json").write_text(json.dumps(
        {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "results": results, "commands": commands}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
