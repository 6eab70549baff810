"""Ahead-of-time packages: where they live, what a failed build says, and a package run as the network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.embedder.aot import CompiledNetwork, build_in_child, build_package, package_path


def test_a_package_is_named_by_its_batch_size_and_side(tmp_path: Path) -> None:
    assert package_path(tmp_path, size=16, image_size=32) == tmp_path / "network-b16-s32.pt2"
    assert package_path(tmp_path, size=16, image_size=32) != package_path(tmp_path, size=16, image_size=64)


def test_a_failed_build_says_why_and_leaves_no_package(tmp_path: Path) -> None:
    package = tmp_path / "network-b1-s32.pt2"
    with pytest.raises(RuntimeError, match="compiling for batches of 1 failed.*no model bundle"):
        build_in_child(tmp_path / "no-bundle", size=1, package=package, device=torch.device("cpu"), timeout_s=120)
    assert not package.exists()


@pytest.mark.slow
def test_a_package_answers_as_the_network_in_bf16(tmp_path: Path) -> None:
    torch.manual_seed(0)

    class Network(torch.nn.Module):  # the embedder's interface: (embedding, logits)
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            embedding = torch.relu(self.bn(self.conv(images))).mean(dim=(2, 3))
            return embedding, self.head(embedding)

    network = Network().eval()
    inputs = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = network(inputs)
    copy = Network()
    copy.load_state_dict(network.state_dict())  # build_package casts the network it is given to bf16
    package = build_package(copy.eval(), size=2, image_size=8, device=torch.device("cpu"),
                            package=tmp_path / "network-b2-s8.pt2")
    assert package.exists() and not list(tmp_path.glob(".*"))  # renamed into place, nothing half-written left
    with torch.no_grad():
        embedding, logits = CompiledNetwork(package)(inputs)  # float32 in: cast to bf16 inside
    assert embedding.dtype == torch.bfloat16 and embedding.shape == (2, 8) and logits.shape == (2, 4)
    assert torch.allclose(embedding.float(), expected[0], atol=5e-2, rtol=5e-2)
    assert torch.allclose(logits.float(), expected[1], atol=5e-2, rtol=5e-2)
    # Run through its C interface (ctypes, the GIL let go): the same answer as torch's own loader gives
    from torch._inductor import aoti_load_package

    theirs = aoti_load_package(str(package))(inputs.to(torch.bfloat16, memory_format=torch.channels_last))
    assert torch.equal(embedding, theirs[0]) and torch.equal(logits, theirs[1])
    # with its weights copied to 64-byte boundaries (the container's own copy: 16), every one of them
    addresses = CompiledNetwork(package)._runner.constant_addresses()
    assert addresses and all(address % 64 == 0 for address in addresses)
    assert package.with_name(package.name + ".so").is_file()  # the library, extracted once beside it


def test_the_compiling_process_runs_only_where_nothing_else_wants_the_cores() -> None:
    code = ("import os; from services.embedder.aot import lowest_priority; lowest_priority(); "
            "print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.getpriority(os.PRIO_PROCESS, 0))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["True", "19"]


def test_a_build_told_to_stop_kills_its_child_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    import threading

    from services.embedder import aot

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def slow_child(command, **kwargs):  # a compiler that would take a minute
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    monkeypatch.setattr(aot.subprocess, "Popen", slow_child)
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    package = tmp_path / "network-b1-s32.pt2"
    with pytest.raises(aot.BuildCancelled):
        build_in_child(tmp_path, size=1, package=package, device=torch.device("cpu"), timeout_s=120, stop=stop)
    assert started and started[0].poll() is not None  # killed, not left running
    assert not package.exists()


def fake_compiler(monkeypatch, script: str) -> list[list[str]]:
    """`ChildBuilds`'s child replaced by `script` run with the same arguments (BUNDLE SIZE:PACKAGE ...); returns
    the commands it was started with."""
    from services.embedder import aot

    commands: list[list[str]] = []
    real_popen = subprocess.Popen

    def child(command, **kwargs):
        commands.append(command)
        return real_popen([sys.executable, "-c", script, *command[3:]], **kwargs)

    monkeypatch.setattr(aot.subprocess, "Popen", child)
    return commands


# Writes each SIZE:PACKAGE given in order, the second only once the test has seen the first ("go" beside it).
WRITES_IN_ORDER = """
import pathlib, sys, time
builds = [argument.split(":", 1) for argument in sys.argv[2:] if ":" in argument]
for n, (size, package) in enumerate(builds):
    package = pathlib.Path(package)
    while n and not (package.parent / "go").exists():
        time.sleep(0.01)
    package.with_name("." + package.name).write_text(size)
    package.with_name("." + package.name).replace(package)
    if size == "4" and "fail" in package.name:
        sys.exit("no compiler for batches of 8")
"""


def test_one_child_builds_every_size_and_each_serves_as_soon_as_it_is_done(tmp_path: Path, monkeypatch) -> None:
    from services.embedder.aot import ChildBuilds

    commands = fake_compiler(monkeypatch, WRITES_IN_ORDER)
    packages = {size: tmp_path / f"network-b{size}-s32.pt2" for size in (1, 4)}
    builds = ChildBuilds(tmp_path / "bundle", list(packages.items()), device=torch.device("cpu"))
    try:
        assert builds.wait(1, timeout_s=60) == packages[1]
        assert not packages[4].exists()  # the first is waited for alone
        (tmp_path / "go").touch()
        assert builds.wait(4, timeout_s=60) == packages[4] and packages[4].read_text() == "4"
    finally:
        builds.close()
    assert len(commands) == 1 and commands[0][4:6] == [f"1:{packages[1]}", f"4:{packages[4]}"]


def test_a_child_that_fails_after_some_sizes_leaves_those_and_says_why_for_the_next(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from services.embedder.aot import ChildBuilds

    fake_compiler(monkeypatch, WRITES_IN_ORDER)
    (tmp_path / "go").touch()
    packages = [(1, tmp_path / "b1.pt2"), (4, tmp_path / "fail-b4.pt2"), (8, tmp_path / "fail-b8.pt2")]
    builds = ChildBuilds(tmp_path / "bundle", packages, device=torch.device("cpu"))
    try:
        builds.wait(1, timeout_s=60)
        builds.wait(4, timeout_s=60)
        with pytest.raises(RuntimeError, match="batches of 8 failed.*no compiler for batches of 8"):
            builds.wait(8, timeout_s=60)
    finally:
        builds.close()
    assert not (tmp_path / "fail-b8.pt2").exists()


def test_the_child_refuses_a_build_that_is_not_a_size_and_a_package(tmp_path: Path) -> None:
    from services.embedder import aot

    with pytest.raises(SystemExit):
        aot.main([str(tmp_path), "4"])  # not SIZE:PACKAGE
