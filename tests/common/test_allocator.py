"""glibc's allocator told to keep freed memory for reuse (services/common/allocator.py)."""

from __future__ import annotations

import ctypes

from services.common import allocator
from services.common.allocator import reuse_freed_memory


class RecordingLibc:
    """Stands in for glibc: records `mallopt` calls, accepts them unless told to refuse."""

    def __init__(self, *, accept: bool = True) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accept = accept

    def gnu_get_libc_version(self) -> bytes:
        return b"2.36"

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1 if self.accept else 0


def test_the_mmap_and_trim_thresholds_are_set() -> None:
    libc = RecordingLibc()
    assert reuse_freed_memory(libc) is True  # type: ignore[arg-type]
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20), (allocator.M_TRIM_THRESHOLD, 64 << 20)]


def test_another_c_library_is_left_alone_and_a_refusal_is_reported(caplog) -> None:
    class Musl:
        def mallopt(self, option: int, value: int) -> int:
            raise AssertionError("not glibc: nothing to call")

    assert reuse_freed_memory(Musl()) is False  # type: ignore[arg-type]
    assert reuse_freed_memory(RecordingLibc(accept=False)) is False  # type: ignore[arg-type]
    assert "refused" in caplog.text


def test_this_machines_glibc_takes_them() -> None:
    assert reuse_freed_memory(ctypes.CDLL("libc.so.6")) is True


def test_released_pages_read_as_zeros_and_the_edges_are_kept() -> None:
    import mmap

    page = mmap.PAGESIZE
    with mmap.mmap(-1, 4 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as memory:  # as the heap: 0xAB
        memory.write(b"\xab" * 4 * page)
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        # from the middle of page 0 to the middle of page 3: pages 1 and 2 are whole inside it
        assert allocator.release_pages(address + page // 2, 3 * page) == 2 * page
        data = memory[:]
    assert data[:page] == b"\xab" * page and data[3 * page:] == b"\xab" * page
    assert data[page:3 * page] == bytes(2 * page)
    assert allocator.release_pages(address + 1, page) == 0  # no whole page inside: nothing
