"""The error tree of services/common/errors.py: everything cbir raises on purpose is a `CbirError`,
so a caller (the CLI, the HTTP edge) can catch that alone and let real bugs keep their tracebacks."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from servers import asgi_client

from services.common import errors
from services.common.collection import find_data_dir, list_classes
from services.common.errors import BulkWriteError, CbirError, CollectionError
from services.common.http import install_error_handlers


def drawn_tree() -> list[tuple[str, str, str]]:
    """(class, its parent, its description) for each branch of the tree drawn at the top of the module."""
    lines = (errors.__doc__ or "").splitlines()
    [root] = [line for line in lines if line.strip() == "CbirError"]
    indent = len(root) - len(root.lstrip())
    branches: list[tuple[str, str, str]] = []
    parents = {0: "CbirError"}
    for line in lines:
        if branch := re.match(r"^([ │]*)[├└]── (\w+)\s*(.*)$", line):
            depth = (len(branch[1]) - indent) // 4 + 1  # four columns a level, below the root's column
            branches.append((branch[2], parents[depth - 1], branch[3]))
            parents[depth] = branch[2]
    return branches


def drawn_status(description: str) -> range:
    """The statuses a drawn description allows: the one it names, 4xx, or 500 when it names none."""
    if status := re.match(r"\(?([1-5])(\d\d|xx)\b", description):
        if status[2] == "xx":
            return range(int(status[1]) * 100, int(status[1]) * 100 + 100)
        code = int(status[1] + status[2])
        return range(code, code + 1)
    return range(500, 501)


def test_the_drawn_tree_is_the_class_tree() -> None:
    # Every class of the module is drawn, each below its base: so every one is a CbirError, and a caller
    # catching a branch (StoreError, ImageError) catches what the drawing puts below it, and only that.
    tree = drawn_tree()
    assert {name for name, _, _ in tree} == {
        c.__name__ for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    } - {"CbirError"}
    for name, parent, _ in tree:
        assert getattr(errors, name).__bases__ == (getattr(errors, parent),), f"{name} is not drawn below its base"


def error_of(cls: type[CbirError]) -> CbirError:
    extra = {"failures": {"a": "refused"}} if cls is BulkWriteError else {}
    return cls("what went wrong", **extra)  # type: ignore[call-arg]


@pytest.mark.anyio
async def test_each_error_answers_with_its_drawn_status_at_the_http_edge() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise error_of(getattr(errors, name))

    async with asgi_client(app) as client:
        for name, _, description in drawn_tree():
            answer = await client.get(f"/raise/{name}")
            assert answer.status_code in drawn_status(description), f"{name}: {answer.status_code} ({description})"
            assert answer.json()["detail"] == "what went wrong"
            if answer.status_code == 503:
                assert int(answer.headers["Retry-After"]) > 0


def test_a_missing_collection_is_a_cbir_error_and_not_a_value_error(tmp_path: Path) -> None:
    for missing in (lambda: find_data_dir(tmp_path / "nowhere"), lambda: list_classes(tmp_path, "train")):
        with pytest.raises(CollectionError) as caught:
            missing()
        assert isinstance(caught.value, CbirError) and not isinstance(caught.value, ValueError)
        assert str(tmp_path) in caught.value.message
