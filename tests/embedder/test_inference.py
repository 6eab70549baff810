"""`cbir train` as a package: what the tiny recipe learns, the settings it reads, and the one forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from reliability_fixtures import classify_test_images, tiny_training_args

from services.common.embedding import HttpEmbeddingClient
from services.common.errors import ConfigError
from services.embedder.bundle import Bundle
from services.embedder.inference import Preprocessing, pick_device, predict
from services.evaluation import cli as evaluate
from services.evaluation.settings import EvaluationSettings
from services.training import train
from services.training.settings import TrainingSettings


def test_the_tiny_bundle_beats_chance_on_images_it_never_saw(tiny_bundle: Bundle, cifar10_dir: Path) -> None:
    # The mini collection holds the first 50 train and 5 test images a class; these are test images 20-69.
    predicted, truth = classify_test_images(tiny_bundle, cifar10_dir, per_class=50, skip=20)
    assert len(truth) == 500
    assert np.mean(predicted == truth) >= 0.25  # chance is 0.10; 0.346 with the fixture's seed


def test_train_takes_the_collection_from_a_dotenv_file(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBIR_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"CBIR_DATA_DIR={mini_collection}\n")
    assert TrainingSettings.load().data_dir == mini_collection
    args = tiny_training_args(mini_collection, tmp_path, "--limit-per-class", "3", "--test-limit-per-class", "2",
                              epochs=1)
    args.data_dir = None  # as if --data-dir were left out
    result = train(args)
    assert (result["train_images"], result["test_images"]) == (30, 20)
    assert "--data-dir" not in json.loads((args.output / "bundle.json").read_text())["training"]["command"]


def test_evaluate_takes_its_defaults_from_settings_and_flags_win(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CBIR_MODEL_DIR", "CBIR_DATA_DIR", "CBIR_STATE_DIR", "CBIR_EVAL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CBIR_EVAL_API_KEY=from-dotenv\nCBIR_MODEL_DIR=models/other\n")
    settings = EvaluationSettings.load()
    assert settings.reproduction_env() == {"CBIR_MODEL_DIR": "models/other"}
    args = evaluate.get_args_parser().parse_args(["--data-dir", "mine"])
    evaluate._apply_settings(args, settings)
    assert (args.api_key, args.model_dir, args.data_dir, args.state_dir) == (
        "from-dotenv", Path("models/other"), Path("mine"), None)
    flagged = evaluate.get_args_parser().parse_args(["--api-key", "from-flag"])
    evaluate._apply_settings(flagged, settings)
    assert flagged.api_key == "from-flag"


def test_predict_normalises_with_the_bundles_mean_and_std_and_checks_the_size() -> None:
    class MeanPixel(torch.nn.Module):
        """`(embedding, logits)` = the per-channel mean of the normalised input, twice."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            means = x.float().mean(dim=(2, 3))
            return means, means

    images = np.full((3, 8, 8, 3), 51, dtype=np.uint8)  # 0.2 after scaling
    pre = Preprocessing(image_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    embeddings, _ = predict(MeanPixel(), images, preprocessing=pre, device=torch.device("cpu"), bf16=False)
    np.testing.assert_allclose(embeddings, [[0.2, 0.0, -1.0]] * 3, atol=1e-6)
    with pytest.raises(ValueError, match=r"takes \(8, 8, 3\)"):
        predict(MeanPixel(), np.zeros((1, 32, 32, 3), dtype=np.uint8), preprocessing=pre,
                device=torch.device("cpu"))


def test_an_unknown_device_is_a_config_error_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="device 'gpu' is not one of: auto, cpu, cuda"):
        pick_device("gpu")
    assert pick_device("cpu").type == "cpu"


@pytest.mark.anyio
async def test_info_says_how_to_decode_and_older_embedders_get_the_defaults(embedder_client: httpx.AsyncClient,
                                                                            tiny_bundle: Bundle) -> None:
    body = (await embedder_client.get("/info")).json()
    assert (body["image_size"], body["resize"]) == (32, "lanczos")
    answers = {"new": {**body, "image_size": 48, "resize": "bicubic"},
               "old": {k: v for k, v in body.items() if k not in ("image_size", "resize")}}
    for name, expected in (("new", (48, "bicubic")), ("old", (32, "lanczos"))):
        transport = httpx.MockTransport(lambda request, answer=answers[name]: httpx.Response(200, json=answer))
        client = HttpEmbeddingClient("http://embedder", transport=transport)
        info = await client.info()
        await client.close()
        assert (info.image_size, info.resize) == expected, name
        assert info.model_version == body["model_version"]
