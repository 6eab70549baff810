"""`cbir` as a process in which torch and torchvision cannot be imported, as in the gateway's image, which lacks
them: `python torchless_cbir.py ARGS...` runs `cbir ARGS...`. An import of either fails as a missing package does
(ModuleNotFoundError), with the traceback of the import that asked for it."""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

ABSENT = ("torch", "torchvision")


class NotInstalled(MetaPathFinder):
    """Ahead of every other finder: the packages in ABSENT are not found, whatever is installed."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, NotInstalled())
    from services.cli import main

    main(sys.argv[1:])
