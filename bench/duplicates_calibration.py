"""Calibrate and check the near-duplicate threshold on copies of CIFAR-10 images the project makes itself.

    python bench/duplicates_calibration.py            # 100 originals a class from train (calibration), from test
                                                      # (held out): about a minute on the 2-core machine
    python bench/duplicates_calibration.py --quick    # 5 a class: seconds (the tests run this)

Each original gets five copies, as a photo library collects them: re-encoded as JPEG at quality 50, resized to
24×24 and back, shifted right by one pixel, brightened by 20 %, and mirrored. A pair of images is a duplicate when
both come from one original; every other pair (distinct images, of the same class or not) is not. Precision and
recall are over pairs of images, mirrors left out (they are reported apart), at each threshold of a grid, on the
similarity `services.search.duplicates` uses (the correlation of `image_signature`s). For comparison, the held-out
images are also embedded with the shipped bundle as indexed images are, and the same figures given for the search
vector's visual part (its PCA embedding) and for the whole fused vector.

The threshold is chosen on the train images (the highest whose recall stays ≥ `--target-recall`); the figures that
count are those of the held-out test images at `DEFAULT_THRESHOLD`, and of the groups `link_groups` makes of them.
With `--cost N`, it also times what the service does with N train images (`--cost 50000`: all of CIFAR-10's train
split): signing their files, the self-join and the groups (`GET /duplicates`), and the near-duplicate check of one
upload against them (`POST /images`), each beside the yardstick of the speed benches measured in the same run (the
shipped model's eager bf16 forward pass of one image, bench/benchlib.py). Writes reports/duplicates.json and
reports/duplicates.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.common.images import decode_image  # noqa: E402
from services.search.duplicates import DEFAULT_THRESHOLD, image_signature, link_groups, similar_pairs  # noqa: E402

KINDS = ("original", "jpeg", "resize", "shift", "bright", "mirror")
GRID = np.round(np.arange(0.70, 0.9996, 0.0025), 4)
GOAL_PRECISION, GOAL_RECALL = 0.95, 0.90
VECTOR_PER_CLASS = 100  # originals a class of the set the search vectors are compared on


def variants(data: bytes) -> dict[str, bytes]:
    """The original's bytes and its five copies, each encoded as a file would be (PNG, but the JPEG copy)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    shifted = Image.new("RGB", image.size)
    shifted.paste(image, (1, 0))
    shifted.paste(image.crop((0, 0, 1, height)), (0, 0))  # the edge column repeated where the image moved away
    copies = {"jpeg": (image, "JPEG"),
              "resize": (image.resize((width * 3 // 4, height * 3 // 4), Image.Resampling.BILINEAR)
                         .resize((width, height), Image.Resampling.BILINEAR), "PNG"),
              "shift": (shifted, "PNG"),
              "bright": (ImageEnhance.Brightness(image).enhance(1.2), "PNG"),
              "mirror": (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")}
    encoded = {"original": data}
    for kind, (copy, image_format) in copies.items():
        buffer = io.BytesIO()
        copy.save(buffer, format=image_format, **({"quality": 50} if image_format == "JPEG" else {}))
        encoded[kind] = buffer.getvalue()
    return encoded


@dataclass
class LabelledSet:
    signatures: np.ndarray  # `image_signature` of each image
    source: np.ndarray  # which original each image comes from
    kind: np.ndarray  # index into KINDS
    label: np.ndarray  # class of the original
    vectors: np.ndarray | None = None  # the fused search vectors, when embedded


def build_set(data_dir: Path, split: str, per_class: int, embedder: Any | None) -> LabelledSet:
    """Every original of `per_class` a class and its copies, signed (and embedded with `embedder`, when given)."""
    images, signatures, source, kind, label = [], [], [], [], []
    classes = sorted(p.name for p in (data_dir / split).iterdir() if p.is_dir())
    for class_index, name in enumerate(classes):
        for file in sorted((data_dir / split / name).iterdir())[:per_class]:
            for kind_name, data in variants(file.read_bytes()).items():
                signatures.append(image_signature(data))
                if embedder is not None:
                    images.append(decode_image(data, size=embedder.preprocessing.image_size,
                                               resample=embedder.preprocessing.resize))
                source.append(len(source) // len(KINDS))
                kind.append(KINDS.index(kind_name))
                label.append(class_index)
    vectors = None
    if embedder is not None:
        vectors = np.stack([e.vector for e in embedder.embed_batch(np.stack(images), purpose="index")])
    return LabelledSet(np.stack(signatures), np.asarray(source), np.asarray(kind), np.asarray(label), vectors)


def pair_curve(features: np.ndarray, labelled: LabelledSet, *, keep: np.ndarray) -> dict[str, Any]:
    """Precision and recall over every pair of the kept images (unit rows of `features`), at each threshold of GRID:
    the pairs above the grid's lowest threshold come from the blockwise join, the others are only counted."""
    index = np.flatnonzero(keep)
    rows, cols, values = similar_pairs(np.ascontiguousarray(features[index], dtype=np.float32), threshold=GRID[0])
    source, label = labelled.source[index], labelled.label[index]
    same, same_class = source[rows] == source[cols], label[rows] == label[cols]
    pairs = lambda counts: int(np.sum(counts * (counts - 1) // 2))  # noqa: E731 - pairs within each group
    positive_total = pairs(np.unique(source, return_counts=True)[1])
    negative_total = len(index) * (len(index) - 1) // 2 - positive_total
    same_class_total = pairs(np.unique(label, return_counts=True)[1]) - positive_total
    positives, negatives = np.sort(values[same]), np.sort(values[~same])
    same_class_negatives = np.sort(values[~same & same_class])
    curve = []
    for threshold in GRID:
        true = len(positives) - np.searchsorted(positives, threshold)
        false = len(negatives) - np.searchsorted(negatives, threshold)
        curve.append({"threshold": float(threshold), "precision": float(true / max(true + false, 1)),
                      "recall": float(true / max(positive_total, 1)), "false_pairs": int(false),
                      "same_class_false_pairs": int(len(same_class_negatives)
                                                    - np.searchsorted(same_class_negatives, threshold))})
    return {"positive_pairs": positive_total, "negative_pairs": negative_total,
            "same_class_negative_pairs": same_class_total, "curve": curve}


def at(curve: dict[str, Any], threshold: float) -> dict[str, Any]:
    return min(curve["curve"], key=lambda row: abs(row["threshold"] - threshold))


def per_kind_recall(features: np.ndarray, labelled: LabelledSet, threshold: float) -> dict[str, float]:
    """Of each kind of copy, the share whose similarity to its own original is at least `threshold`."""
    originals = features[labelled.kind == 0]
    return {kind: float(np.mean(np.sum(originals * features[labelled.kind == number], axis=1) >= threshold))
            for number, kind in enumerate(KINDS[1:], start=1)}


def grouped(labelled: LabelledSet, threshold: float, *, keep: np.ndarray) -> dict[str, Any]:
    """The groups `link_groups` makes of the kept images: pairs in one group scored as above, and how many
    groups hold two originals' images."""
    index = np.flatnonzero(keep)
    rows, cols, _ = similar_pairs(labelled.signatures[index], threshold=threshold)
    groups = link_groups(len(index), rows, cols)
    group_of = np.full(len(index), -1)
    for number, members in enumerate(groups):
        group_of[members] = number
    source = labelled.source[index]
    together = sum(len(members) * (len(members) - 1) // 2 for members in groups)
    true = sum(int(np.sum(counts * (counts - 1) // 2))
               for counts in (np.unique(source[members], return_counts=True)[1] for members in groups))
    positives = int(np.sum((counts := np.unique(source, return_counts=True)[1]) * (counts - 1) // 2))
    mixed = sum(len(set(source[members].tolist())) > 1 for members in groups)
    return {"groups": len(groups), "largest_group": max((len(m) for m in groups), default=0),
            "groups_of_several_originals": int(mixed), "precision": true / max(together, 1),
            "recall": true / max(positives, 1)}


def evaluate(labelled: LabelledSet, *, threshold: float) -> dict[str, Any]:
    """The figures of one set at `threshold`, on the signatures."""
    no_mirror = labelled.kind != KINDS.index("mirror")
    everything = np.ones(len(labelled.kind), dtype=bool)
    curve = pair_curve(labelled.signatures, labelled, keep=no_mirror)
    return {"images": int(len(labelled.kind)), "originals": int(np.sum(labelled.kind == 0)),
            "signature": curve, "signature_with_mirrors": pair_curve(labelled.signatures, labelled, keep=everything),
            "at_threshold": at(curve, threshold),
            "recall_by_kind": per_kind_recall(labelled.signatures, labelled, threshold),
            "grouped": grouped(labelled, threshold, keep=no_mirror)}


def compare_vectors(labelled: LabelledSet, *, pca_dims: int) -> dict[str, Any]:
    """The same pairs scored by the search vector instead: its visual part (the PCA embedding) and the whole fused
    vector, beside the signature, on one embedded set."""
    assert labelled.vectors is not None
    visual = labelled.vectors[:, :pca_dims] / np.linalg.norm(labelled.vectors[:, :pca_dims], axis=1, keepdims=True)
    no_mirror = labelled.kind != KINDS.index("mirror")
    return {"originals": int(np.sum(labelled.kind == 0)),
            "signature": pair_curve(labelled.signatures, labelled, keep=no_mirror),
            "vector_visual": pair_curve(visual, labelled, keep=no_mirror),
            "vector_fused": pair_curve(labelled.vectors, labelled, keep=no_mirror)}


def cost(data_dir: Path, count: int, embedder: Any | None) -> dict[str, Any]:
    """Seconds to sign `count` train files, to group them, and to check one upload against them, with the yardstick
    (one image's eager bf16 forward pass, in ms) measured in the same run, and the load average."""
    import os

    import benchlib
    import torch

    from services.search.duplicate_jobs import DuplicateFinder

    files = sorted((data_dir / "train").glob("*/*"))[:count]
    started = time.perf_counter()
    signatures = np.stack([image_signature(file.read_bytes()) for file in files])
    signing_s = time.perf_counter() - started
    started = time.perf_counter()
    rows, cols, _ = similar_pairs(signatures, threshold=DEFAULT_THRESHOLD)
    groups = link_groups(len(files), rows, cols)
    grouping_s = time.perf_counter() - started
    finder = DuplicateFinder()
    finder._signatures = {str(i): ((0, 0.0), row) for i, row in enumerate(signatures)}  # as a finished job leaves it
    finder._signed = True
    query = image_signature(variants(files[0].read_bytes())["jpeg"])
    finder.near_duplicates(query, threshold=DEFAULT_THRESHOLD, exclude="")  # builds the matrix once
    started = time.perf_counter()
    for _ in range(20):
        decoded = image_signature(variants(files[1].read_bytes())["jpeg"])
        finder.near_duplicates(decoded, threshold=DEFAULT_THRESHOLD, exclude="")
    check_ms = (time.perf_counter() - started) / 20 * 1000
    stick = None
    if embedder is not None:
        stick = benchlib.yardstick(embedder.bundle, batch=1, views=1, device=torch.device("cpu"), seconds=3.0)
    forward_ms = stick.seconds_per_image * 1000 if stick else None
    return {"images": len(files), "signing_s": round(signing_s, 2), "grouping_s": round(grouping_s, 2),
            "groups": len(groups), "upload_check_ms": round(check_ms, 2),
            "forward_ms": forward_ms and round(forward_ms, 2),
            "check_over_forward": forward_ms and round(check_ms / forward_ms, 3),
            "load_1min": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()}


def choose(curve: dict[str, Any], target_recall: float) -> float:
    """The highest threshold of the grid whose recall still reaches `target_recall` (the most precision). Not a
    precision target: the distinct files of one photo that CIFAR-10 holds keep precision flat at high thresholds."""
    return max((row["threshold"] for row in curve["curve"] if row["recall"] >= target_recall), default=float(GRID[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 originals a class: seconds (development, tests)")
    parser.add_argument("--per-class", type=int, default=300, help="originals a class, of each split")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "cifar10")
    parser.add_argument("--model-dir", type=Path, default=None, help="the bundle (default: the shipped one)")
    parser.add_argument("--target-recall", type=float, default=0.999,
                        help="the recall the chosen threshold must keep on the calibration images")
    parser.add_argument("--no-vectors", action="store_true",
                        help="leave out the search vectors' figures (no model: seconds)")
    parser.add_argument("--cost", type=int, default=0, metavar="N",
                        help="also time signing, grouping and the upload check on N train images (0: no)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "reports")
    args = parser.parse_args(argv)
    from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from services.embedder.runtime import Embedder

    per_class = 5 if args.quick else args.per_class
    embedder = None if args.no_vectors else Embedder(load_bundle(args.model_dir or DEFAULT_BUNDLE_DIR), device="cpu")
    started = time.perf_counter()
    calibration = build_set(args.data_dir, "train", per_class, None)
    held_out = build_set(args.data_dir, "test", per_class, None)
    calibrated = evaluate(calibration, threshold=DEFAULT_THRESHOLD)
    result = {"command": " ".join(["python", "bench/duplicates_calibration.py", *(argv or sys.argv[1:])]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "model_version": embedder.model_version if embedder else None,
              "per_class": per_class, "target_recall": args.target_recall,
              "chosen_on_train": choose(calibrated["signature"], args.target_recall),
              "default_threshold": DEFAULT_THRESHOLD, "calibration": calibrated,
              "held_out": evaluate(held_out, threshold=DEFAULT_THRESHOLD)}
    if embedder is not None:
        embedded = build_set(args.data_dir, "test", min(per_class, VECTOR_PER_CLASS), embedder)
        result["vectors"] = compare_vectors(embedded, pca_dims=embedder.pca_dims)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.cost:
        result["cost"] = cost(args.data_dir, args.cost, embedder)
    row = result["held_out"]["at_threshold"]
    result["goal_met"] = row["precision"] >= GOAL_PRECISION and row["recall"] >= GOAL_RECALL
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "duplicates.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.output_dir / "duplicates.md").write_text(render(result))
    print(render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    """reports/duplicates.md: the figures at the default threshold, per kind of copy, and the curve near it."""
    held, threshold = result["held_out"], result["default_threshold"]
    row, mirrored = held["at_threshold"], at(held["signature_with_mirrors"], threshold)
    lines = [
        "# Near-duplicate threshold: calibration on CIFAR-10 copies", "",
        f"`{result['command']}` ({result['date']}, {result['seconds']} s).", "",
        f"{result['per_class']} originals a class from each split, each with five copies (JPEG quality 50, resized "
        "to 24×24 and back, shifted by one pixel, brightened 20 %, mirrored); a pair is a duplicate when both images "
        "come from one original. The threshold is chosen on the train images (the highest whose recall stays ≥ "
        f"{result['target_recall']}: {result['chosen_on_train']}); the figures below are of the held-out test "
        f"images at the default, **{threshold}** (the similarity of `image_signature`s).", "",
        "| held-out, mirrors left out | value |", "| --- | --- |",
        f"| precision (pairs) | {row['precision']:.4f} (goal ≥ {GOAL_PRECISION}) |",
        f"| recall (pairs) | {row['recall']:.4f} (goal ≥ {GOAL_RECALL}) |",
        f"| false pairs / of them same class | {row['false_pairs']} / {row['same_class_false_pairs']}, of "
        f"{held['signature']['negative_pairs']} distinct pairs ({held['signature']['same_class_negative_pairs']} "
        "same class) |",
        f"| goal met | {'yes' if result['goal_met'] else 'no'} |",
        f"| groups (`link_groups`) | {held['grouped']['groups']}, largest {held['grouped']['largest_group']}, "
        f"{held['grouped']['groups_of_several_originals']} holding two originals' images |",
        f"| grouped precision / recall (pairs in one group) | {held['grouped']['precision']:.4f} / "
        f"{held['grouped']['recall']:.4f} |", "",
        "Recall of each kind of copy against its own original (held out):", "",
        "| copy | recall |", "| --- | --- |",
        *[f"| {kind} | {held['recall_by_kind'][kind]:.3f} |" for kind in KINDS[1:]], "",
        f"A mirrored copy does not count as a duplicate: with mirrors counted, precision {mirrored['precision']:.4f}, "
        f"recall {mirrored['recall']:.4f}.", "",
        "The curve near the default (held out, mirrors left out):", "",
        "| threshold | precision | recall | false pairs |", "| --- | --- | --- | --- |",
        *[f"| {r['threshold']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['false_pairs']} |"
          for r in held["signature"]["curve"] if abs(r["threshold"] - threshold) <= 0.0301], "",
    ]
    if "cost" in result:
        c = result["cost"]
        lines += [f"Cost with {c['images']:,} CIFAR-10 train images (load {c['load_1min']}, {c['threads']} threads; "
                  "provisional on a busy machine): signing their files "
                  f"{c['signing_s']} s, the self-join and groups {c['grouping_s']} s ({c['groups']} groups); the "
                  f"check of one upload {c['upload_check_ms']} ms, {c['check_over_forward']}× the yardstick (one "
                  f"image's eager bf16 forward pass, {c['forward_ms']} ms in the same run).", ""]
    if "vectors" in result:
        compared = result["vectors"]
        lines += [f"The search vector instead of the signature ({compared['originals']} held-out originals and their "
                  "copies, embedded with the shipped bundle as indexed images are; mirrors left out), each at its "
                  "best threshold:", "",
                  f"- the signature: {best(compared['signature'])}",
                  f"- the search vector's visual part (its PCA embedding): {best(compared['vector_visual'])}",
                  f"- the whole search vector (PCA ⊕ weighted one-hot): {best(compared['vector_fused'])}", ""]
    return "\n".join(lines)


def best(curve: dict[str, Any]) -> str:
    """The threshold with the most recall at precision ≥ GOAL_PRECISION, or the most precise one if none reaches it."""
    feasible = [r for r in curve["curve"] if r["precision"] >= GOAL_PRECISION]
    pick = max(feasible, key=lambda r: r["recall"]) if feasible else max(curve["curve"], key=lambda r: r["precision"])
    return (f"threshold {pick['threshold']}, precision {pick['precision']:.4f}, recall {pick['recall']:.4f}"
            + ("" if feasible else f" (no threshold reaches precision {GOAL_PRECISION})") + ".")


if __name__ == "__main__":
    sys.exit(main())
