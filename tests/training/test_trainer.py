"""The VGG-16 model, the backbone registry, the bundle format, and `cbir train`'s checkpoint and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_fixtures import tiny_training_args

from services.common.errors import BundleError, TrainingError
from services.embedder.bundle import load_bundle
from services.embedder.inference import Preprocessing
from services.embedder.model import BACKBONES, CifarVGG16, build_model
from services.embedder.runtime import Embedder
from services.training import get_args_parser, loop, train, trainer
from services.training.augment import augment
from services.training.loop import make_scheduler
from services.training.losses import batch_hard_triplet_loss, distillation_loss


def quick_args(collection: Path, work: Path, *extra: str, epochs: int, output: Path):
    """The tests' tiny recipe on 20 images a class, in batches of 100, without flip TTA."""
    return tiny_training_args(collection, work, "--batch-size", "100", "--embedding-dim", "32", "--pca-components",
                              "16", "--pca-dims", "8", "--limit-per-class", "20", "--no-flip-tta", *extra,
                              epochs=epochs, output=output)


def test_forward_returns_embedding_and_logits() -> None:
    model = CifarVGG16(width_mult=0.125, embedding_dim=32).eval()
    embedding, logits = model(torch.randn(3, 3, 32, 32))
    assert embedding.shape == (3, 32) and logits.shape == (3, 10)
    assert (embedding >= 0).all()  # taken after the ReLU


def test_full_width_is_torchvision_vgg16_bn_features() -> None:
    from torchvision.models import vgg16_bn

    ours = CifarVGG16().features.state_dict()
    theirs = vgg16_bn(weights=None).features.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[name].shape == theirs[name].shape for name in ours)


def test_bundle_round_trip_gives_the_trained_predictions(tiny_bundle_dir: Path, mini_collection: Path) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    metadata = json.loads((tiny_bundle_dir / "bundle.json").read_text())
    assert metadata["version"] == bundle.version
    assert metadata["classes"][0] == "airplane" and len(metadata["classes"]) == 10
    assert {"test_accuracy", "test_accuracy_flip_tta"} <= metadata["metrics"].keys()
    assert metadata["training"]["command"].startswith("cbir train")
    embedder = Embedder(bundle)
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    first, again = embedder.embed_batch(images), Embedder(load_bundle(tiny_bundle_dir)).embed_batch(images)
    np.testing.assert_allclose(first[0].vector, again[0].vector, atol=1e-6)
    assert embedder.dims == 26 and first[0].vector.shape == (26,)


@pytest.mark.parametrize("damage", ["missing_dir", "truncated_weights", "bad_json", "wrong_architecture",
                                    "missing_pca"])
def test_broken_bundle_is_refused_with_a_clear_message(tmp_path: Path, tiny_bundle_dir: Path, damage: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    if damage == "missing_dir":
        shutil.rmtree(bundle)
    elif damage == "truncated_weights":
        data = (bundle / "model.safetensors").read_bytes()
        (bundle / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad_json":
        (bundle / "bundle.json").write_text("{not json")
    elif damage == "wrong_architecture":
        metadata = json.loads((bundle / "bundle.json").read_text())
        metadata["architecture"]["embedding_dim"] = 128
        (bundle / "bundle.json").write_text(json.dumps(metadata))
    elif damage == "missing_pca":
        (bundle / "pca.safetensors").unlink()
    with pytest.raises(BundleError, match="cbir train|do not match"):
        load_bundle(bundle)


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


def test_distillation_loss_is_the_scaled_kl_to_the_teachers_averaged_softened_probabilities() -> None:
    torch.manual_seed(0)
    student, first, second = torch.randn(3, 4, 10).unbind(0)
    temperature = 4.0
    # No loss when the student already says what its one teacher says.
    assert distillation_loss(first, [first], temperature).item() == pytest.approx(0.0, abs=1e-6)
    # Two teachers: the target is the mean of their probabilities at the temperature, not of their logits.
    target = ((first / temperature).softmax(1) + (second / temperature).softmax(1)) / 2
    student_probabilities = (student / temperature).softmax(1)
    expected = (target * (target.log() - student_probabilities.log())).sum(1).mean() * temperature ** 2
    assert distillation_loss(student, [first, second], temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    # Its gradient moves the student towards the teachers.
    logits = student.clone().requires_grad_()
    distillation_loss(logits, [first, second], temperature).backward()
    stepped = (logits - 10.0 * logits.grad).detach()
    assert distillation_loss(stepped, [first, second], temperature) < distillation_loss(student, [first, second],
                                                                                        temperature)


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
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bundle_dir, teacher)
    metadata = json.loads((teacher / "bundle.json").read_text())
    metadata["classes"] = list(reversed(metadata["classes"]))
    (teacher / "bundle.json").write_text(json.dumps(metadata))
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


def test_swa_batch_norm_statistics_describe_the_whole_split_even_when_it_is_stored_class_by_class() -> None:
    torch.manual_seed(0)
    model = CifarVGG16(width_mult=0.125, embedding_dim=32).to(memory_format=torch.channels_last)
    # Two "classes" of very different brightness, stored one after the other like a decoded split.
    images = torch.cat([torch.full((100, 32, 32, 3), 20, dtype=torch.uint8),
                        torch.full((100, 32, 32, 3), 230, dtype=torch.uint8)])

    def first_bn_variance(batch_size: int) -> torch.Tensor:
        swa = torch.optim.swa_utils.AveragedModel(model)
        swa.update_parameters(model)
        averaged = loop.averaged_model(swa, images, torch.Generator().manual_seed(0), bf16=False, cutout=0,
                                       batch_size=batch_size, preprocessing=Preprocessing())
        return averaged.features[1].running_var

    whole = first_bn_variance(batch_size=200)  # one batch: the split's own statistics
    ratio = first_bn_variance(batch_size=20) / whole
    assert 0.8 < ratio.median().item() < 1.2  # single-class batches would give a fraction of it


def test_batch_hard_triplet_loss_is_zero_for_separated_classes() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert batch_hard_triplet_loss(separated, labels, margin=0.2).item() == pytest.approx(0.0)
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.01, 1.0]])
    assert batch_hard_triplet_loss(mixed, labels, margin=0.2).item() > 0.5


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


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 20])
def test_schedule_works_for_short_runs(schedule: str, steps: int) -> None:
    # A quick run on a few images can have a single step per epoch; OneCycleLR alone fails below ~8 steps.
    args = get_args_parser().parse_args(["--epochs", "1", "--lr", "0.1", "--schedule", schedule])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert all(0 < rate <= args.lr + 1e-12 for rate in rates)
    assert max(rates) > args.lr / 4


@pytest.mark.parametrize("side", [1, 8, 16])
def test_cutout_zeroes_one_square_per_image_clipped_at_the_border(side: int) -> None:
    batch = torch.ones(64, 3, 32, 32)
    out = augment(batch, torch.Generator().manual_seed(0), pad=0, cutout=side)
    erased = out == 0
    # The same pixels are erased in every channel, and the square is at most side × side.
    assert torch.equal(erased.all(dim=1), erased.any(dim=1))
    counts = erased[:, 0].sum(dim=(1, 2))
    assert counts.max().item() == side * side  # some square lies wholly inside
    assert counts.min().item() >= ((side + 1) // 2) ** 2 > 0  # a corner centre keeps at least a quarter
    rows = erased[:, 0].any(dim=2).sum(dim=1)
    cols = erased[:, 0].any(dim=1).sum(dim=1)
    assert torch.equal(counts, rows * cols)  # a rectangle: clipped, never wrapped around
    assert len({tuple(m.nonzero()[0].tolist()) for m in erased[:, 0]}) > 1  # a different place per image


def test_no_cutout_erases_nothing() -> None:
    out = augment(torch.ones(16, 3, 32, 32), torch.Generator().manual_seed(0), pad=0)
    assert bool((out == 1).all())


def test_the_registry_builds_each_backbone_for_its_input_size() -> None:
    for name, entry in BACKBONES.items():
        model = build_model({"name": name, "embedding_dim": 16, "width_mult": 0.125}, 3).eval()
        embedding, logits = model(torch.randn(2, 3, entry.input_size, entry.input_size))
        assert embedding.shape == (2, 16) and logits.shape == (2, 3), name
    with pytest.raises(ValueError, match="architecture 'ResNet9' is not one of: CifarVGG16"):
        build_model({"name": "ResNet9"}, 10)


def edit_metadata(bundle: Path, change) -> None:
    metadata = json.loads((bundle / "bundle.json").read_text())
    change(metadata)
    (bundle / "bundle.json").write_text(json.dumps(metadata))


def test_the_bundle_carries_its_preprocessing_and_older_bundles_get_the_defaults(
        tmp_path: Path, tiny_bundle_dir: Path) -> None:
    written = load_bundle(tiny_bundle_dir).preprocessing
    assert written == Preprocessing(image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                                    resize="lanczos", flip_tta=True)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    edit_metadata(bundle, lambda m: m.update(preprocessing={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    older = load_bundle(bundle).preprocessing
    assert (older.image_size, older.resize, older.flip_tta, older.mean) == (32, "lanczos", False, (0.5, 0.5, 0.5))
    info = Embedder(load_bundle(bundle)).info()
    assert (info.image_size, info.resize) == (32, "lanczos")


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["preprocessing"].update(resize="sinc"), "resample filter 'sinc' is not one of: nearest"),
    (lambda m: m["preprocessing"].update(std=[0.2, 0.0, 0.2]), "positive deviations"),
    (lambda m: m["architecture"].update(name="ResNet9"), "architecture 'ResNet9' is not one of: CifarVGG16"),
])
def test_a_bundle_with_unknown_preprocessing_or_architecture_is_refused(
        tmp_path: Path, tiny_bundle_dir: Path, change, message: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    edit_metadata(bundle, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)
