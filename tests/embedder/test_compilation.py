"""Compilation: which compiled sizes a chunk goes through, where the packages go, the warm-up thread."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from services.embedder.compilation import WarmUp, batch_buckets, compile_cache_dir, compiled_pieces


def test_batch_buckets_cover_every_chunk_size() -> None:
    assert batch_buckets(64) == (1, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 4, 8, 16, 32, 48)
    assert batch_buckets(2) == (1, 2)
    assert batch_buckets(1) == (1,)


def test_a_chunk_goes_through_compiled_sizes_with_little_padding() -> None:
    sizes = (1, 2, 4, 8, 16, 32, 64)
    assert compiled_pieces(13, sizes) == [(16, 13)]  # 3 blank of 16: padded
    assert compiled_pieces(17, sizes) == [(16, 16), (1, 1)]  # 15 blank of 32 would be: split
    assert compiled_pieces(50, sizes) == [(64, 50)]
    assert compiled_pieces(5, ()) == [(None, 5)]  # nothing compiled: eager
    for count in range(1, 65):
        pieces = compiled_pieces(count, sizes)
        assert sum(take for _, take in pieces) == count and all(take <= size for size, take in pieces)


def test_a_query_never_pays_for_a_much_larger_compiled_batch() -> None:
    """The warm-up trap: with only 64 compiled, a one-image query was padded to 64 (twice, with its mirror)."""
    assert compiled_pieces(1, (64,)) == [(None, 1)]  # eager until a size that fits is compiled
    assert compiled_pieces(2, (1, 64)) == [(1, 1), (1, 1)]
    assert compiled_pieces(50, (64,)) == [(64, 50)]  # a quarter of padding at most
    assert compiled_pieces(40, (1, 64)) == [(1, 1)] * 40  # never padded beyond a quarter
    for count in range(1, 129):
        for sizes in ((64,), (1, 64), (1, 2, 4), (8, 16)):
            pieces = compiled_pieces(count, sizes)
            assert sum(take for _, take in pieces) == count
            assert all(size is None or size - take <= size // 4 for size, take in pieces)


def test_the_cache_folder_is_one_per_bundle_torch_and_device(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    one = compile_cache_dir(tmp_path, bundle_version="vgg16-10c-aaaa", device=cpu)
    assert one.parent == tmp_path and torch.__version__.replace("+", "_") in one.name and one.name.endswith("-cpu")
    assert one != compile_cache_dir(tmp_path, bundle_version="vgg16-10c-bbbb", device=cpu)
    assert one != compile_cache_dir(tmp_path, bundle_version="vgg16-10c-aaaa", device=torch.device("cuda"))
    assert compile_cache_dir(tmp_path, bundle_version="../x/y", device=cpu).parent == tmp_path  # never elsewhere


def test_the_warm_up_thread_compiles_until_done_and_stops_between_sizes() -> None:
    calls: list[str] = []

    def compile_three() -> bool:
        calls.append(threading.current_thread().name)
        return len(calls) < 3

    warm_up = WarmUp(compile_three)
    warm_up.start()
    assert warm_up.done.wait(10) and calls == ["embedder-compile"] * 3
    gate, entered = threading.Event(), threading.Event()

    def compile_slowly() -> bool:
        entered.set()
        return gate.wait(10)

    stopped = WarmUp(compile_slowly)
    stopped.start()
    assert entered.wait(10)
    stopped.stop(timeout_s=0.01)  # asked to stop while a size compiles: that one finishes, no other starts
    gate.set()
    assert stopped.done.wait(10)
