"""`cbir train` (services/training/trainer.py): what the tiny recipe learns, the settings it reads, checkpoint
and resume, distillation from teacher bundles, SWA, and starting from a bundle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from factories import copy_bundle
from tiny_models import classify_test_images, tiny_training_args

from services.common.errors import TrainingError
from services.embedder.bundle import Bundle, load_bundle
from services.training import loop, train, trainer
from services.training.settings import TrainingSettings


def quick_args(collection: Path, work: Path, *extra: str, epochs: int, output: Path):
    """The tests' tiny recipe on 20 images a class, in batches of 100, without flip TTA."""
    return tiny_training_args(collection, work, "--batch-size", "100", "--embedding-dim", "32", "--pca-components",
                              "16", "--pca-dims", "8", "--limit-per-class", "20", "--no-flip-tta", *extra,
                              epochs=epochs, output=output)


def test_a_time_budget_trains_until_it_is_spent_whatever_epochs_say_and_the_bundle_records_how_far(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = itertools.count(0.0, 0.5)  # every reading of the loop's clock is half a second after the last
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    train(quick_args(mini_collection, tmp_path, "--time-budget-min", "0.2", epochs=1, output=tmp_path / "b"))
    training = json.loads((tmp_path / "b" / "bundle.json").read_text())["training"]
    budget, history = training["budget"], training["history"]
    assert budget["minutes"] == 0.2 and 12 <= budget["trained_seconds"] < 14  # stops at the first step past 12 s
    assert len(history) > 1 and budget["epochs_reached"] == budget["images_seen"] / 200 > 1
    assert history[-1]["epochs_reached"] == budget["epochs_reached"]
    assert history[-1]["lr"] < 0.05 / 10 < history[0]["lr"] / 2  # the cycle (peak 0.05) ran down by the end
    assert "--time-budget-min 0.2" in training["command"]
    with pytest.raises(TrainingError, match="--time-budget-min"):
        train(quick_args(mini_collection, tmp_path, "--time-budget-min", "1", "--swa-epochs", "1", epochs=2,
                         output=tmp_path / "c"))


def test_training_resumes_from_its_checkpoint(tmp_path: Path, mini_collection: Path) -> None:
    train(quick_args(mini_collection, tmp_path, epochs=2, output=tmp_path / "a"))
    checkpoint = torch.load(tmp_path / "train" / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 2
    # Resuming a finished run trains no more epochs and writes the same bundle.
    train(quick_args(mini_collection, tmp_path, "--resume", epochs=2, output=tmp_path / "b"))
    assert load_bundle(tmp_path / "a").version == load_bundle(tmp_path / "b").version
    # Resuming with more epochs re-plans the schedule, and the bundle says so next to its command.
    train(quick_args(mini_collection, tmp_path, "--resume", epochs=3, output=tmp_path / "d"))
    training = json.loads((tmp_path / "d" / "bundle.json").read_text())["training"]
    assert training["replans"] == [{"after_epoch": 2, "planned_epochs": 2, "epochs": 3}]
    assert len(training["history"]) == 3
    assert "replans" not in json.loads((tmp_path / "a" / "bundle.json").read_text())["training"]
    changed = quick_args(mini_collection, tmp_path, "--resume", "--batch-size", "50", epochs=2, output=tmp_path / "c")
    with pytest.raises(TrainingError, match="--resume: batch_size differ"):
        train(changed)


def test_training_distils_from_teacher_bundles_and_records_them(
        tmp_path: Path, mini_collection: Path, tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teachers = ["--teacher", str(tiny_bundle_dir), "--teacher", str(tiny_bundle_dir)]
    calls = []
    real_loss = loop.distillation_loss

    def spy(student_logits, teacher_logits, temperature):
        calls.append((len(teacher_logits), temperature))
        return real_loss(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(loop, "distillation_loss", spy)
    train(quick_args(mini_collection, tmp_path, "--distill-weight", "0.5", *teachers, epochs=1, output=tmp_path / "a"))
    assert calls == [(2, 4.0)] * 2  # 200 images, batches of 100: both teachers in every step
    training = json.loads((tmp_path / "a" / "bundle.json").read_text())["training"]
    teacher_version = load_bundle(tiny_bundle_dir).version
    assert [t["version"] for t in training["teachers"]] == [teacher_version, teacher_version]
    assert f"--teacher {tiny_bundle_dir} --teacher {tiny_bundle_dir}" in training["command"]
    assert training["recipe"]["teacher"] == [str(tiny_bundle_dir)] * 2

    # A resumed run must distil from the same teachers.
    fewer = quick_args(mini_collection, tmp_path, "--distill-weight", "0.5", *teachers[:2], "--resume", epochs=1,
                       output=tmp_path / "b")
    with pytest.raises(TrainingError, match="--resume: teacher differ"):
        train(fewer)


def test_missing_or_unfit_teachers_and_bad_distillation_options_are_refused(
        tmp_path: Path, mini_collection: Path, tiny_bundle_dir: Path) -> None:
    teacher = copy_bundle(tiny_bundle_dir, tmp_path / "teacher", lambda m: m.update(classes=m["classes"][::-1]))
    args = tiny_training_args(mini_collection, tmp_path, "--limit-per-class", "5", "--teacher", str(teacher), epochs=1)
    with pytest.raises(TrainingError, match="--teacher .*classes"):
        train(args)
    args.teacher = [tmp_path / "no-such-bundle"]
    with pytest.raises(TrainingError, match="--teacher .*no model bundle"):
        train(args)
    args.teacher, args.distill_weight = [tiny_bundle_dir], 1.5
    with pytest.raises(TrainingError, match="--distill-weight"):
        train(args)
    args.distill_weight, args.init_bundle = 0.9, tmp_path / "no-such-bundle"
    with pytest.raises(TrainingError, match="--init-bundle .*no model bundle"):
        train(args)
    args.init_bundle, args.device = None, "tpu"
    with pytest.raises(TrainingError, match="--device: device 'tpu' is not one of: auto, cpu, cuda"):
        train(args)
    args.device, args.checkpoint_every = "cpu", 0
    with pytest.raises(TrainingError, match="--checkpoint-every"):
        train(args)
    assert not args.output.exists()


def test_swa_ships_the_average_of_its_epochs_and_resumes_mid_average(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def swa_args(name: str, *extra: str):
        return quick_args(mini_collection, tmp_path / name, "--swa-epochs", "2", "--swa-lr", "0.02", *extra,
                          epochs=3, output=tmp_path / name / "bundle")

    averaged: list[dict[str, torch.Tensor]] = []
    update = torch.optim.swa_utils.AveragedModel.update_parameters

    def record(self, model):
        averaged.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return update(self, model)

    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", record)
    train(swa_args("a"))
    assert len(averaged) == 2  # the ends of epochs 2 and 3
    shipped = dict(load_bundle(tmp_path / "a" / "bundle").model.named_parameters())
    for name, value in averaged[0].items():
        expected = (value + averaged[1][name]) / 2
        torch.testing.assert_close(shipped[name].float(), expected, rtol=2e-3, atol=2e-3)  # fp16 in the bundle
    training = json.loads((tmp_path / "a" / "bundle" / "bundle.json").read_text())["training"]
    assert [epoch["lr"] for epoch in training["history"]][1:] == [0.02, 0.02]

    # Stopped after epoch 2 (mid-average) and resumed: the same bundle as the run that went through.
    saves = []
    real_save = trainer.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(swa_args("b"))
    train(swa_args("b", "--resume"))
    assert saves == [0, 1, 2]
    assert load_bundle(tmp_path / "b" / "bundle").version == load_bundle(tmp_path / "a" / "bundle").version


def test_training_can_start_from_a_bundle(tmp_path: Path, mini_collection: Path, tiny_bundle_dir: Path) -> None:
    args = tiny_training_args(mini_collection, tmp_path, "--batch-size", "100", "--lr", "0.0001", "--init-bundle",
                              str(tiny_bundle_dir), epochs=1)
    train(args)
    start = load_bundle(tiny_bundle_dir).model.features[0].weight
    continued = load_bundle(args.output).model.features[0].weight
    # A tiny learning rate moves the weights a little: continued from the bundle, not from scratch.
    assert torch.allclose(start, continued, atol=1e-2)
    assert not torch.equal(start, continued)
    parent = load_bundle(args.output).metadata["training"]["parent"]
    assert parent["version"] == load_bundle(tiny_bundle_dir).version
    assert parent["command"].startswith("cbir train") and parent["epochs"] >= 1


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


def test_the_studys_other_backbones_train_into_bundles_the_embedder_serves(tmp_path: Path,
                                                                          mini_collection: Path) -> None:
    """`cbir train --arch`: a bundle of the study's small CNN records its architecture and version prefix,
    loads back, and embeds like the VGG-16 one; a backbone that cannot take an option says so."""
    from services.embedder.runtime import Embedder

    result = train(quick_args(mini_collection, tmp_path, "--arch", "CifarCNN", epochs=2, output=tmp_path / "cnn"))
    bundle = load_bundle(tmp_path / "cnn")
    assert bundle.metadata["architecture"]["name"] == "CifarCNN" and bundle.version.startswith("cnn-10c-")
    assert result["version"] == bundle.version
    [embedding] = Embedder(bundle, device="cpu").embed_batch(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    assert embedding.vector.shape == (8 + 10,) and embedding.label in bundle.classes
    with pytest.raises(TrainingError, match="--arch CifarResNet50: ResNet-50 comes at full width only"):
        train(quick_args(mini_collection, tmp_path, "--arch", "CifarResNet50", "--width-mult", "0.5", epochs=1,
                         output=tmp_path / "r"))
    with pytest.raises(TrainingError, match="--arch CifarMLP: --pretrained imagenet is not available"):
        train(quick_args(mini_collection, tmp_path, "--arch", "CifarMLP", "--pretrained", "imagenet", epochs=1,
                         output=tmp_path / "m"))


def test_freeze_pretrained_trains_only_the_layers_imagenet_did_not_fill_and_keeps_their_statistics(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's transfer mode: `--pretrained imagenet --freeze-pretrained` ships the ImageNet convolutions
    and batch-norm statistics untouched (here torchvision's layout at random weights: no download) and a
    trained head; without --pretrained, or with SWA (which re-estimates batch norms), it is refused."""
    from torchvision.models import vgg16_bn

    from services.embedder import backbones

    torch.manual_seed(7)
    source = vgg16_bn(weights=None).state_dict()
    monkeypatch.setattr(backbones, "imagenet_state_dict", lambda weights: source)
    initial: dict[str, torch.Tensor] = {}

    def freeze(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
        initial.update({key: value.clone() for key, value in model.state_dict().items()})
        return real_freeze(model, names)

    trained: dict[str, torch.Tensor] = {}

    def write_bundle(*args: object, model: torch.nn.Module, **kwargs: object) -> dict[str, object]:
        trained.update(model.state_dict())  # the weights the bundle is written from, before their fp16 copy
        return real_write_bundle(*args, model=model, **kwargs)

    real_freeze, real_write_bundle = trainer.freeze, trainer.write_bundle
    monkeypatch.setattr(trainer, "freeze", freeze)
    monkeypatch.setattr(trainer, "write_bundle", write_bundle)
    args = quick_args(mini_collection, tmp_path, "--width-mult", "1", "--pretrained", "imagenet",
                      "--freeze-pretrained", epochs=1, output=tmp_path / "frozen")
    train(args)
    bundle = load_bundle(tmp_path / "frozen")
    shipped = bundle.model.state_dict()
    features = [key for key in trained if key.startswith("features.")]
    assert any(key.endswith("running_mean") for key in features) and set(features) <= set(shipped)
    for key in features:
        assert torch.equal(initial[key], source[key]) and torch.equal(trained[key], source[key]), key
        assert torch.allclose(shipped[key].float(), source[key].float(), rtol=1e-3, atol=1e-4), key  # fp16 file
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])  # the head did train
    assert not torch.equal(trained["embedding.2.running_mean"], initial["embedding.2.running_mean"])
    assert "--pretrained imagenet --freeze-pretrained" in bundle.metadata["training"]["command"]
    for extra in (("--freeze-pretrained",), ("--pretrained", "imagenet", "--freeze-pretrained", "--swa-epochs", "1")):
        with pytest.raises(TrainingError, match="--freeze-pretrained needs --pretrained imagenet"):
            train(quick_args(mini_collection, tmp_path, *extra, epochs=2, output=tmp_path / "refused"))
