"""Python's garbage collector in a long-running service (services/common/collector.py)."""

from __future__ import annotations

import subprocess
import sys


def test_start_up_objects_are_set_aside_once_and_garbage_before_them_collected() -> None:
    # In a process of its own: a frozen object stays frozen for the life of the process.
    code = """
import gc
from services.common.collector import freeze_startup_objects

class Node:
    pass

alive, garbage = Node(), Node()
garbage.cycle = garbage
del garbage
tracked = len(gc.get_objects())
frozen = freeze_startup_objects()
assert gc.get_freeze_count() == frozen > 0
assert not any(isinstance(o, Node) for o in gc.get_objects())  # `alive` is set aside, the cycle collected
assert len(gc.get_objects()) < tracked / 10
assert freeze_startup_objects() == 0 and gc.get_freeze_count() == frozen  # a second call does nothing
after = Node()
assert any(o is after for o in gc.get_objects())  # what is made later is collected as usual
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
