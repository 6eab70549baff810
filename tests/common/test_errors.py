"""The error tree of services/common/errors.py: everything cbir raises on purpose is a `CbirError`,
so a caller (the CLI, the HTTP edge) can catch that alone and let real bugs keep their tracebacks."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from services.common import errors
from services.common.collection import find_data_dir, list_classes
from services.common.errors import BulkWriteError, CbirError, CollectionError, StoreAuthError, StoreError


def test_every_error_of_the_module_is_in_the_cbir_tree() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert {"CollectionError", "BulkWriteError", "SearchApiError", "StoreAuthError"} <= {c.__name__ for c in classes}
    assert all(issubclass(c, CbirError) for c in classes)
    assert all(c.__name__ in (errors.__doc__ or "") for c in classes)  # the drawn tree names each one


def test_store_errors_are_store_errors() -> None:
    assert issubclass(BulkWriteError, StoreError) and issubclass(StoreAuthError, StoreError)
    assert BulkWriteError("2 refused", failures={"a": "x", "b": "y"}).failures == {"a": "x", "b": "y"}


def test_a_missing_collection_is_a_cbir_error_and_not_a_value_error(tmp_path: Path) -> None:
    for missing in (lambda: find_data_dir(tmp_path / "nowhere"), lambda: list_classes(tmp_path, "train")):
        with pytest.raises(CollectionError) as caught:
            missing()
        assert isinstance(caught.value, CbirError) and not isinstance(caught.value, ValueError)
        assert str(tmp_path) in caught.value.message
