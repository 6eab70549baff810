"""The document schema (services/common/documents.py): ids that stay the same from run to run and release
to release, and documents that gain and lose their vector without losing a field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from factories import make_document

from services.common.documents import ImageDocument, StoredImage, StoreHit, content_id, document_id


def test_a_document_id_is_the_one_earlier_releases_stored() -> None:
    # Ids are written into every index: a change here orphans every index already built (and the ids in the
    # API's documented examples, taken from the shipped collection at /work/shared/cifar10).
    assert document_id("/work/shared/cifar10", "train/cat/3195.jpg") == "08df7e6fb1028ba8d710"


@pytest.mark.parametrize(("one", "other"), [
    (("/a", "train/cat/1.jpg"), ("/b", "train/cat/1.jpg")),  # two collections with the same layout
    (("/a", "train/cat/1.jpg"), ("/a", "train/cat/2.jpg")),
    (("/a", "b/c.jpg"), ("/a/b", "c.jpg")),  # the same joined path, split differently
])
def test_different_images_get_different_document_ids(one: tuple[str, str], other: tuple[str, str]) -> None:
    assert document_id(*one) != document_id(*other)


def test_ids_are_twenty_hex_digits() -> None:
    for id in (document_id("/a", "b.jpg"), content_id(b"\x89PNG...")):
        assert len(id) == 20 and set(id) <= set("0123456789abcdef")


def test_a_content_id_depends_on_the_bytes_alone() -> None:
    assert content_id(b"the same bytes") == content_id(bytes(bytearray(b"the same bytes")))
    assert content_id(b"the same bytes") != content_id(b"the same bytes!")
    assert content_id(b"") != content_id(b"\x00")


# --- ImageDocument and StoredImage --------------------------------------------------------------


def stored_fields(image: StoredImage) -> dict[str, object]:
    return {field.name: getattr(image, field.name) for field in dataclasses.fields(StoredImage)}


def test_stored_drops_the_vector_and_keeps_every_field() -> None:
    document = make_document("d1", np.ones(4, dtype=np.float32), label=None, predicted_label="dog",
                             confidence=0.25, size=840, mtime=12.5)
    stored = document.stored()
    assert type(stored) is StoredImage and not hasattr(stored, "vector")
    assert stored_fields(stored) == stored_fields(document)


def test_of_gives_a_stored_image_a_vector_and_the_changes_asked_for() -> None:
    image = make_document("d1", np.zeros(4, dtype=np.float32), label="cat", predicted_label="cat").stored()
    vector = np.arange(8, dtype=np.float32)
    document = ImageDocument.of(image, vector=vector, model_version="v2", predicted_label="dog")
    assert document.vector is vector
    assert (document.model_version, document.predicted_label) == ("v2", "dog")
    assert stored_fields(document) == stored_fields(image) | {"model_version": "v2", "predicted_label": "dog"}
    assert ImageDocument.of(image, vector=vector).stored() == image  # a round trip without changes


def test_of_refuses_a_field_the_schema_does_not_have() -> None:
    image = make_document("d1", np.zeros(4, dtype=np.float32)).stored()
    with pytest.raises(TypeError):
        ImageDocument.of(image, vector=np.zeros(4, dtype=np.float32), colour="red")


def test_documents_are_frozen() -> None:
    document = make_document("d1", np.zeros(4, dtype=np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        document.label = "dog"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        document.stored().label = "dog"  # type: ignore[misc]


def test_a_hit_is_known_by_its_image_s_id() -> None:
    image = make_document("d7", np.zeros(4, dtype=np.float32)).stored()
    hit = StoreHit(image=image, score=1.5)
    assert hit.id == "d7" and hit.image is image
