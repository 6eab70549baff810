"""The network compiled ahead of time (AOTInductor): one package per batch size, built in a child process at the
lowest CPU priority and loaded in milliseconds, so that nothing of a compilation runs in the serving process.

    python -m services.embedder.aot BUNDLE_DIR SIZE:PACKAGE [SIZE:PACKAGE ...] [--device cpu]   # `ChildBuilds` runs it

torch.compile in the serving process held its GIL for long stretches of C code while it traced, and its threads and
C++ compiler took the cores: eager searches beside it took up to 21 × their time, and a restart traced every size
again (its graph caches refuse the frozen graph). A package is the compiled code with the weights in it: a restart
loads it (`CompiledNetwork`) and traces nothing.

The package runs the network in bf16 weights (inputs cast to bf16), as autocast runs its convolutions and linear
layers; the eager network stays under autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch._C import _aoti

from services.common.allocator import release_pages

logger = logging.getLogger(__name__)


class CompiledNetwork(torch.nn.Module):
    """A loaded package behind the network's interface: `(N, 3, S, S)` inputs → `(embedding, logits)`, for the one
    batch size it was built for (channels_last bf16 inside, whatever it is given).

    On the CPU the package's shared library runs through its C interface with ctypes, which lets go of the GIL
    for the length of the forward pass; torch's own loader (`aoti_load_package`, used on CUDA) holds it
    throughout, and the server's event loop stood still for every batch (16 clients: 140 against 190-214
    queries/s with torch.compile, 2026-12-05)."""

    def __init__(self, package: Path, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.package = package
        self._runner = _CpuRunner(package) if device is None or device.type == "cpu" else _torch_loader(package)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, logits = self._runner(inputs.to(torch.bfloat16, memory_format=torch.channels_last))
        return embedding, logits


def _torch_loader(package: Path) -> Callable[[torch.Tensor], Sequence[torch.Tensor]]:
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(package))


class _ConstantEntry(ctypes.Structure):
    """`AOTInductorConstantMapEntry` (interface.h): a constant's name and its tensor handle."""

    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


class _CpuRunner:
    """The package's model container, created and run through the C interface AOTInductor exports
    (`torch/csrc/inductor/aoti_runtime/interface.h`): `...CreateWithDevice`, `...Run`, `...Delete`. The tensors
    cross as the handles torch makes for that interface (`torch._C._aoti`), which `Run` takes ownership of.

    The weights it runs with are copies it owns, 64-byte aligned (`_align_constants`). The container loads them into
    one `malloc` block, aligned to 16 bytes only, and oneDNN's AMX convolutions ran 1.5-3 × slower on weights not
    aligned to 64: a package at batch 64 ran 1,000 or 1,600 images/s by the heap's state at load time, about one
    load in four the fast one (two cores, 2026-12-05; docs/performance.md#aligned-weights)."""

    _capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    _capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    _capsule = ctypes.pythonapi.PyCapsule_New
    _capsule.restype, _capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

    def __init__(self, package: Path) -> None:
        self._library = ctypes.CDLL(str(_extract_library(package)))
        self._run = self._library.AOTInductorModelContainerRun
        self._run.restype = ctypes.c_int32
        self._run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
        self._handle, self.package = ctypes.c_void_p(), package
        self._constants: list[int] = []  # handles of the weights' copies: the container borrows them
        _check(self._library.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self._handle), ctypes.c_size_t(1), b"cpu", None), "load", package)
        outputs = ctypes.c_size_t()
        _check(self._library.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(outputs)),
               "inspect", package)
        self._outputs = outputs.value
        self._align_constants()

    def _align_constants(self) -> None:
        """Copy each of the container's constants into a tensor of its own (`aoti_torch_clone`: torch's allocator,
        64-byte aligned), have the container run with the copies (`...UpdateUserManagedConstantBufferPairs`, the
        active set), and give the pages of its own block back to the kernel: nothing reads them again."""
        library, handle = self._library, self._handle
        entries, count = ctypes.POINTER(_ConstantEntry)(), ctypes.c_size_t()
        _check(library.AOTInductorModelContainerExtractConstantsMapEntries(
            handle, ctypes.byref(entries), ctypes.byref(count), ctypes.c_bool(False)), "read", self.package)
        sizes = self._constant_sizes()
        pairs = (_ConstantEntry * count.value)()
        spans: list[tuple[int, int]] = []  # (address, bytes) of the container's own copies
        for i in range(count.value):
            copy, data = ctypes.c_void_p(), ctypes.c_void_p()
            _check(library.aoti_torch_get_data_ptr(ctypes.c_void_p(entries[i].handle), ctypes.byref(data)), "read",
                   self.package)
            _check(library.aoti_torch_clone(ctypes.c_void_p(entries[i].handle), ctypes.byref(copy)), "copy",
                   self.package)
            self._constants.append(copy.value)
            if data.value:
                spans.append((data.value, sizes.get(entries[i].name, 0)))
            pairs[i].name, pairs[i].handle = entries[i].name, copy.value
        _check(library.AOTInductorModelContainerUpdateUserManagedConstantBufferPairs(
            handle, pairs, ctypes.c_size_t(count.value), ctypes.c_bool(False), ctypes.c_bool(False)), "update",
            self.package)
        if spans:  # the block's pages between its first constant and the end of its last
            start = min(address for address, _ in spans)
            release_pages(start, max(address + size for address, size in spans) - start)

    def constant_addresses(self) -> list[int]:
        """Where the weights the container runs with now lie: each constant's data address."""
        entries, count = ctypes.POINTER(_ConstantEntry)(), ctypes.c_size_t()
        _check(self._library.AOTInductorModelContainerExtractConstantsMapEntries(
            self._handle, ctypes.byref(entries), ctypes.byref(count), ctypes.c_bool(False)), "read", self.package)
        addresses = []
        for i in range(count.value):
            data = ctypes.c_void_p()
            _check(self._library.aoti_torch_get_data_ptr(ctypes.c_void_p(entries[i].handle), ctypes.byref(data)),
                   "read", self.package)
            addresses.append(data.value or 0)
        return addresses

    def _constant_sizes(self) -> dict[bytes, int]:
        """Each constant's bytes in the package, by name."""
        library, count, sizes = self._library, ctypes.c_size_t(), {}
        _check(library.AOTInductorModelContainerGetNumConstants(self._handle, ctypes.byref(count)), "inspect",
               self.package)
        for index in range(count.value):
            name, size = ctypes.c_char_p(), ctypes.c_size_t()
            _check(library.AOTInductorModelContainerGetConstantName(self._handle, ctypes.c_size_t(index),
                                                                     ctypes.byref(name)), "inspect", self.package)
            _check(library.AOTInductorModelContainerGetConstantDataSize(self._handle, ctypes.c_size_t(index),
                                                                         ctypes.byref(size)), "inspect", self.package)
            sizes[name.value or b""] = size.value
        return sizes

    def __call__(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        capsules = _aoti.unsafe_alloc_void_ptrs_from_tensors([inputs])
        handles = [self._capsule_pointer(capsule, None) for capsule in capsules]
        input_array = (ctypes.c_void_p * len(handles))(*handles)
        output_array = (ctypes.c_void_p * self._outputs)()
        _check(self._run(self._handle, input_array, len(handles), output_array, self._outputs, None, None),
               "run", self.package)
        return _aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [self._capsule(output_array[i], None, None) for i in range(self._outputs)])

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._library.AOTInductorModelContainerDelete(handle)
        for constant in getattr(self, "_constants", ()):  # after the container, which borrowed them
            self._library.aoti_torch_delete_tensor_object(ctypes.c_void_p(constant))


def _check(code: int, what: str, package: Path) -> None:
    if code != 0:
        raise RuntimeError(f"could not {what} the compiled network {package.name} (AOTInductor error {code})")


def _extract_library(package: Path) -> Path:
    """The package's shared library (its code and weights), beside the package as `<package>.so`: written once,
    under another name then renamed, so that a process loading it never finds half of one."""
    library = package.with_name(package.name + ".so")
    if library.exists() and library.stat().st_mtime >= package.stat().st_mtime:
        return library
    with zipfile.ZipFile(package) as archive:
        [member] = [name for name in archive.namelist() if "/aotinductor/" in name and name.endswith(".so")]
        partial = library.with_name(f".{library.name}.{os.getpid()}")
        with archive.open(member) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target)
    partial.replace(library)
    return library


def import_loader(device: torch.device) -> None:
    """Do now, at start-up, what the first package load does once (import torch's inductor, 0.8 s here; then its
    check of the device it runs on, 0.13 s more), not in the warm-up thread while a search waits for the GIL:
    searches beside a first load took 348 ms, then 118 ms (2026-12-05)."""
    from torch._inductor import aoti_load_package  # noqa: F401

    try:  # what `aoti_load_package` compares with the package's metadata; private, so a warm-up only
        from torch._inductor.codecache import get_device_information

        get_device_information(device.type)
    except Exception:  # noqa: BLE001 - the first load does it instead
        logger.debug("could not check the device ahead of the first package load", exc_info=True)


def package_path(folder: Path, *, size: int, image_size: int) -> Path:
    """Where the package for batches of `size` lives in a bundle's compile folder (`compile_cache_dir`)."""
    return folder / f"network-b{size}-s{image_size}.pt2"


def build_package(model: torch.nn.Module, *, size: int, image_size: int, device: torch.device, package: Path) -> Path:
    """Export `model` for batches of `size` and compile it into `package` (written under another name, then
    renamed: a package is whole or absent). Minutes of the C++ compiler; `build_in_child` runs it elsewhere."""
    import torch._inductor.config as inductor_config

    network = model.to(device, dtype=torch.bfloat16, memory_format=torch.channels_last).eval()
    example = torch.zeros(size, 3, image_size, image_size, device=device, dtype=torch.bfloat16)
    example = example.contiguous(memory_format=torch.channels_last)
    package.parent.mkdir(parents=True, exist_ok=True)
    partial = package.with_name(f".{package.stem}.{os.getpid()}.pt2")  # aoti_compile_and_package wants .pt2
    with torch.no_grad(), inductor_config.patch(freezing=True):  # weights as constants: conv and batch norm fused
        exported = torch.export.export(network, (example,))
        torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
    partial.replace(package)
    return package


class BuildCancelled(Exception):
    """`build_in_child` was told to stop: its child process is gone, no package was written."""


class ChildBuilds:
    """The packages of several batch sizes, built one after another by one child process at the lowest CPU priority
    (`python -m services.embedder.aot`), each renamed into place as it is done, so that the first can serve while the
    others build. One process for all of them: each size after the first saves the child's start-up (importing
    torch, the bundle, inductor's first compilation: 5-8 s of the 16-23 s a size took in a process of its own, two
    cores, 2026-12-05).

    >>> builds = ChildBuilds(bundle_dir, [(1, package_1), (4, package_4)], device=torch.device("cpu"))
    >>> builds.wait(1, timeout_s=600)   # starts the child; returns once package_1 is in place
    >>> builds.wait(4, timeout_s=600)
    >>> builds.close()                  # kills the child if it still runs

    `wait` raises `RuntimeError` with the end of the child's output when it fails or takes over `timeout_s`, and
    `BuildCancelled` once `stop` is set (the server shuts down): either way the child is killed first, so no
    compiler outlives the process that asked for it. Its C++ caches go beside the packages."""

    def __init__(self, bundle_dir: Path, builds: Sequence[tuple[int, Path]], *, device: torch.device,
                 stop: threading.Event | None = None) -> None:
        self.bundle_dir, self.device, self.stop = bundle_dir, device, stop
        self.packages = dict(builds)
        self._child: subprocess.Popen[bytes] | None = None
        self._output: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._closing = threading.Lock()  # the waiting thread and the service's close may both close it

    def wait(self, size: int, *, timeout_s: float) -> Path:
        package = self.packages[size]
        if self._child is None:
            self._start()
        assert self._child is not None
        deadline = time.monotonic() + timeout_s
        while not package.exists():
            if self.stop is not None and self.stop.is_set():
                self.close()
                raise BuildCancelled(f"compiling for batches of {size} stopped")
            ended = self._child.poll() is not None and not package.exists()  # it ended without this package
            if ended or time.monotonic() > deadline:
                self._kill()  # the child is gone after this: its whole output is there
                reason = f"exit code {self._child.returncode}" if ended else f"over {timeout_s:.0f} s"
                output = self._output_tail()
                self.close()
                raise RuntimeError(f"compiling for batches of {size} failed ({reason}): {output}")
            _exited(self._child, within_s=0.2)
        return package

    def close(self) -> None:
        """Kill the child if it still runs (what it finished stays) and drop its output."""
        with self._closing:
            self._kill()
            if self._output is not None:
                self._output.close()
                self._output = None

    def _kill(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait()

    def _start(self) -> None:
        builds = [f"{size}:{package}" for size, package in sorted(self.packages.items())]
        command = [sys.executable, "-m", "services.embedder.aot", str(self.bundle_dir), *builds,
                   "--device", self.device.type]
        folder = next(iter(self.packages.values())).parent
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor")}
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by `close`
        self._child = subprocess.Popen(command, env=env, stdout=self._output, stderr=subprocess.STDOUT)

    def _output_tail(self) -> str:
        if self._output is None:
            return ""
        self._output.flush()
        self._output.seek(0)
        return self._output.read().decode(errors="replace").strip()[-2000:]


def build_in_child(bundle_dir: Path, *, size: int, package: Path, device: torch.device, timeout_s: float,
                   stop: threading.Event | None = None) -> None:
    """`build_package` for one size of the bundle at `bundle_dir`, in a child process (`ChildBuilds`)."""
    builds = ChildBuilds(bundle_dir, [(size, package)], device=device, stop=stop)
    try:
        builds.wait(size, timeout_s=timeout_s)
    finally:
        builds.close()


def _exited(child: subprocess.Popen[bytes], *, within_s: float) -> bool:
    try:
        child.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def lowest_priority() -> None:
    """This process (and the compilers it starts) runs only on cores nothing else wants: SCHED_IDLE where Linux
    has it, else the highest nice. At nice 19 alone, the searches beside a compilation still took 2-3 × their
    time on two cores (the forward pass's threads woke on cores the compiler held)."""
    os.nice(19)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.embedder.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("builds", nargs="+", metavar="SIZE:PACKAGE", type=_build_argument,
                        help="a batch size and the package to write for it; built in the order given")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    lowest_priority()
    from services.common.errors import CbirError
    from services.embedder.bundle import load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except CbirError as exc:
        raise SystemExit(exc.message) from None
    for size, package in args.builds:
        started = time.perf_counter()
        build_package(bundle.model, size=size, image_size=bundle.preprocessing.image_size,
                      device=torch.device(args.device), package=package)
        logger.info("compiled %s for batches of %d in %.1f s", args.bundle, size, time.perf_counter() - started)


def _build_argument(text: str) -> tuple[int, Path]:
    size, _, package = text.partition(":")
    if not size.isdigit() or not package:
        raise argparse.ArgumentTypeError(f"expected SIZE:PACKAGE, got {text!r}")
    return int(size), Path(package)


if __name__ == "__main__":
    main()
