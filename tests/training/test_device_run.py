"""The run a lent GPU machine gets (bench/device/): run.sh rehearsed end to end on the CPU with the tiny budget,
collect.sh rebuilding its bundle from the returned files, what comes back and how it is verified, and that
`cbir train` imports with only the machine's packages and the carried wheels."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from services.common.collection import REPO_ROOT
from services.embedder.bundle import load_bundle

DEVICE = REPO_ROOT / "bench" / "device"
_spec = importlib.util.spec_from_file_location("device_run", DEVICE / "device_run.py")
device_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_run)
RETURNABLE = re.compile(r"[A-Za-z0-9._-]+")  # the names the device tool brings back


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory, mini_collection: Path) -> Path:
    """A carried folder as prepare.sh makes it, with the mini collection packed by the shared tool's copy instead of
    all of CIFAR-10 (no wheels: this environment has the packages)."""
    folder = tmp_path_factory.mktemp("device")
    subprocess.run([sys.executable, str(DEVICE / "cifar10_pack.py"), "pack", str(mini_collection),
                    str(folder / "cifar10.pack.npz")], check=True, capture_output=True, timeout=60)
    return folder


def rehearse(tmp_path: Path, pack: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CBIR_DEVICE_TINY": "1", "CBIR_DEVICE_DIR": str(pack), "OUT": str(tmp_path / "out"),
                   "CBIR_DEVICE_WORK": str(tmp_path / "work"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(DEVICE / "run.sh")], env=environment, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_device_run_rehearses_on_the_cpu_and_collect_rebuilds_its_bundle(tmp_path: Path, tiny_pack: Path) -> None:
    started = time.perf_counter()
    done = rehearse(tmp_path, tiny_pack, CBIR_DEVICE_PART_BYTES="200000")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rehearsal_s = time.perf_counter() - started
    returned = {path.name: path.stat().st_size for path in (tmp_path / "out").iterdir()}
    assert len(returned) <= 8 and all(size < 16 * 2**20 and RETURNABLE.fullmatch(name)
                                      for name, size in returned.items())
    assert {"SHA256SUMS", "bundle.json", "pca.safetensors", "logs.tar.gz", "model.safetensors.00",
            "model.safetensors.01"} <= set(returned)  # the narrow network's weights in parts of 200,000 bytes
    # The last lines of the output say what came of it (the device tool returns the output's end).
    assert "bundle vgg16-10c-" in done.stdout and "test accuracy" in done.stdout

    collected = subprocess.run(["bash", str(DEVICE / "collect.sh"), str(tmp_path / "out"), str(tmp_path / "bundle")],
                               capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stderr[-3000:]
    bundle = load_bundle(tmp_path / "bundle")
    result = json.loads((tmp_path / "bundle-logs" / "logs" / "result.json").read_text())
    assert json.loads(collected.stdout)["version"] == bundle.version == result["result"]["version"]
    assert bundle.metadata["metrics"]["test_images"] == 20 and result["result"]["test_images"] == 20
    recipe = bundle.metadata["training"]["recipe"]
    assert (recipe["crop_padding"], recipe["ema_decay"], recipe["batch_size"], recipe["time_budget_min"]) == (
        "reflect", 0.995, 25, 0.02)  # the device's recipe, with the rehearsal's tiny options over it
    budget = result["budget"]
    assert budget["minutes"] == 0.02 and 1.2 <= budget["trained_seconds"] < 5 and budget["epochs_reached"] > 1
    assert set(result["phases"]) == {"install", "unpack"} and len(result["tries"]) == 1
    assert (tmp_path / "bundle-logs" / "logs" / "profile.txt").read_text().count("aten::") > 5
    assert "unpacked 550 images" in (tmp_path / "bundle-logs" / "logs" / "run.log").read_text()
    print(f"rehearsal: {rehearsal_s:.1f} s")  # pytest -s shows it; docs/model.md quotes it
    assert rehearsal_s < 60


@pytest.mark.slow
def test_a_failed_device_run_still_brings_its_logs_back(tmp_path: Path, tiny_pack: Path) -> None:
    done = rehearse(tmp_path, tiny_pack, CBIR_DEVICE_TRAIN_ARGS="--ema-decay 1")
    assert done.returncode == 1
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["SHA256SUMS", "logs.tar.gz"]
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        result = json.load(tar.extractfile("logs/result.json"))
    assert "--ema-decay must be at least 0 and below 1" in result["tries"][0]["error"] and "result" not in result
    assert "failed: services.common.errors.TrainingError" in done.stdout
    with pytest.raises(SystemExit, match="lists no complete bundle"):
        device_run.collect(tmp_path / "out", tmp_path / "bundle")


def test_the_returned_files_rebuild_the_bundle_only_when_every_sha256_matches(
        tmp_path: Path, tiny_bundle_dir: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "run.log").write_text("trained\n")
    weights = (tiny_bundle_dir / "model.safetensors").stat().st_size
    sizes = device_run.pack_out(tiny_bundle_dir, tmp_path / "out", logs=logs, part_bytes=-(-weights // 3))
    parts = [name for name in sizes if name.startswith("model.safetensors.")]
    assert parts == ["model.safetensors.00", "model.safetensors.01", "model.safetensors.02"]
    assert sum(sizes[name] for name in parts) == weights and len(sizes) == 7
    assert device_run.collect(tmp_path / "out", tmp_path / "bundle")["version"] == load_bundle(tiny_bundle_dir).version
    assert (tmp_path / "bundle-logs" / "logs" / "run.log").read_text() == "trained\n"

    damaged = tmp_path / "out" / parts[-1]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match=f"{parts[-1]}: its SHA-256 is not the one the device recorded"):
        device_run.collect(tmp_path / "out", tmp_path / "again")
    with pytest.raises(RuntimeError, match=r"holds 1\d files \(at most 8 come back\)"):  # 7 parts or more
        device_run.pack_out(tiny_bundle_dir, tmp_path / "many", logs=logs, part_bytes=weights // 7)
    with pytest.raises(ValueError, match="must be under 16777216"):
        device_run.pack_out(tiny_bundle_dir, tmp_path / "big", logs=logs, part_bytes=16 * 2**20)


@pytest.mark.slow
def test_cbir_train_imports_with_only_the_machines_packages_and_the_carried_wheels() -> None:
    done = subprocess.run([sys.executable, str(DEVICE / "device_run.py"), "check-imports"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split("of the carried packages it loaded", 1)[1]
    assert "pydantic-settings" in loaded and "skops" not in loaded  # scikit-learn's loader only for BOVW bundles
    pins = subprocess.run([sys.executable, str(DEVICE / "device_run.py"), "pins"], capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()
    assert [pin.split("==")[0] for pin in pins] == list(device_run.CARRIED)
