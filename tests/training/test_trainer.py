"""`cbir train` (services/training/trainer.py): what the tiny recipe learns, the settings it reads, checkpoint
and resume, distillation from teacher bundles, SWA and EMA, starting from a bundle, the speed and recipe
options (compile, reflect padding, scaled learning rate and warm-up, SAM) and what bundle.json records of them."""

from __future__ import annotations

import itertools
import json
import math
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from factories import copy_bundle
from tiny_models import classify_test_images, tiny_training_args

from services.common.errors import TrainingError
from services.embedder.bundle import Bundle, load_bundle
from services.training import get_args_parser, loop, train, trainer
from services.training.sam import SharpnessAwareMinimization
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
    saved, real_save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, state: saved.append(state["epoch"]) or real_save(
        path, state))
    train(quick_args(mini_collection, tmp_path, "--time-budget-min", "0.2", "--checkpoint-every", "100",
                     "--test-every", "100", epochs=1, output=tmp_path / "b"))
    training = json.loads((tmp_path / "b" / "bundle.json").read_text())["training"]
    budget, history = training["budget"], training["history"]
    # The last epoch is the one that spent the budget, whatever --epochs says: checkpointed and tested there alone.
    assert saved == [len(history) - 1] and [("test_accuracy" in epoch) for epoch in history] == [False] * (
        len(history) - 1) + [True]
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


def test_ema_ships_the_running_average_of_the_weights_and_batch_norm_statistics_and_resumes_mid_run(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def ema_args(name: str, *extra: str):
        return quick_args(mini_collection, tmp_path / name, "--ema-decay", "0.6", "--ema-every", "2", *extra,
                          epochs=3, output=tmp_path / name / "bundle")

    states: list[dict[str, torch.Tensor]] = []  # the model's weights and buffers at each update
    update = torch.optim.swa_utils.AveragedModel.update_parameters

    def record(self, model):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return update(self, model)

    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", record)
    train(ema_args("a"))
    assert len(states) == 3  # 2 steps an epoch, every second step, 3 epochs
    expected = {k: v.float() for k, v in states[0].items()}  # the first update copies
    for state in states[1:]:
        expected = {k: 0.6 * v + 0.4 * state[k].float() for k, v in expected.items()}
    shipped = load_bundle(tmp_path / "a" / "bundle").model.state_dict()
    for name in ("features.0.weight", "features.1.running_mean", "features.1.running_var", "embedding.2.running_var"):
        torch.testing.assert_close(shipped[name].float(), expected[name], rtol=2e-3, atol=2e-3)  # fp16 in the bundle
    assert not torch.allclose(shipped["features.1.running_mean"].float(), states[-1]["features.1.running_mean"],
                              rtol=2e-3, atol=2e-3)  # not the last weights
    training = json.loads((tmp_path / "a" / "bundle" / "bundle.json").read_text())["training"]
    assert all("ema_test_accuracy" in epoch for epoch in training["history"])
    assert "--ema-decay 0.6 --ema-every 2" in training["command"]

    # Stopped after epoch 2 and resumed: the same bundle as the run that went through.
    real_save = trainer.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(ema_args("b"))
    train(ema_args("b", "--resume"))
    assert load_bundle(tmp_path / "b" / "bundle").version == load_bundle(tmp_path / "a" / "bundle").version
    with pytest.raises(TrainingError, match="--resume: ema_decay, ema_every differ"):
        train(quick_args(mini_collection, tmp_path / "b", "--resume", epochs=3, output=tmp_path / "b" / "c"))


def test_every_training_option_is_recorded_in_the_bundle_and_its_command_remakes_the_run(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = ("--crop-padding", "reflect", "--scale-lr", "--warmup-epochs", "1", "--ema-decay", "0.9",
               "--sam-rho", "0.05", "--test-every", "2", "--profile-steps", "2", "--compile", "off")
    args = quick_args(mini_collection, tmp_path, *options, epochs=3, output=tmp_path / "b")
    rates, paddings, real_step, real_augment = [], [], loop.train_step, loop.augment

    def step(model, optimizer, *rest, sam, **kwargs):
        assert isinstance(sam, SharpnessAwareMinimization) and sam.rho == 0.05
        rates.append(optimizer.param_groups[0]["lr"])
        return real_step(model, optimizer, *rest, sam=sam, **kwargs)

    def augment(*args, padding, **kwargs):
        paddings.append(padding)
        return real_augment(*args, padding=padding, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "augment", augment)
    train(args)
    # 2 steps an epoch (6 too few for one-cycle: the warm-up + cosine schedule, its own warm-up 1 epoch) at a
    # peak of 0.05 x 100 / 256, times the linear warm-up's 1/2 and 2/2 over the first epoch.
    peak = 0.05 * 100 / 256
    schedule = [0.5, 1.0, *(0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4))]
    ramp = [0.5, 1.0, 1, 1, 1, 1]
    assert rates == pytest.approx([peak * s * r for s, r in zip(schedule, ramp, strict=True)])
    assert paddings == ["reflect"] * 6
    training = json.loads((tmp_path / "b" / "bundle.json").read_text())["training"]
    recipe = training["recipe"]
    assert (recipe["crop_padding"], recipe["scale_lr"], recipe["warmup_epochs"], recipe["ema_decay"],
            recipe["sam_rho"], recipe["compile"]) == ("reflect", True, 1.0, 0.9, 0.05, "off")
    assert "--crop-padding reflect --scale-lr --warmup-epochs 1.0 --ema-decay 0.9 --sam-rho 0.05 " in (
        training["command"])
    assert not any(flag in training["command"] for flag in ("--compile", "--test-every", "--profile-steps"))
    environment = training["environment"]
    assert environment["peak_lr"] == pytest.approx(peak, abs=1e-6) and environment["steps"] == 6
    assert (environment["compiled"], environment["random_draws"], environment["torch"]) == (False, "cpu",
                                                                                            torch.__version__)
    assert [("test_accuracy" in epoch, "ema_test_accuracy" in epoch) for epoch in training["history"]] == [
        (False, False), (True, True), (True, True)]  # every second epoch, and the last
    assert "Self CPU" in (tmp_path / "train" / "profile.txt").read_text()  # torch.profiler's table
    again = get_args_parser().parse_args(shlex.split(training["command"])[2:])
    assert all(getattr(again, key) == getattr(args, key) for key in ("crop_padding", "scale_lr", "warmup_epochs",
                                                                     "ema_decay", "sam_rho"))


def test_compile_runs_the_steps_through_torch_compile_and_keeps_the_first_steps_time_out_of_the_budget(
        tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_compile, models, now = torch.compile, [], [0.0]

    def compile_for_test(model, mode=None):  # dynamo's tracing and guards, without generating code
        assert mode is None  # --compile default: torch's default mode
        return real_compile(model, backend="eager")

    def clock() -> float:  # every reading half a second after the last
        now[0] += 0.5
        return now[0]

    real_step = loop.train_step

    def step(model, *args, **kwargs):
        models.append(type(model).__name__)
        if len(models) == 1:
            now[0] += 100  # the first step compiles: a long one
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_for_test)
    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=clock))
    train(quick_args(mini_collection, tmp_path, "--compile", "default", "--time-budget-min", "0.1", epochs=1,
                     output=tmp_path / "b"))
    assert set(models) == {"OptimizedModule"} and len(models) > 2  # the budget (6 s) outlasted the first step
    training = json.loads((tmp_path / "b" / "bundle.json").read_text())["training"]
    environment = training["environment"]
    assert environment["compiled"] is True and environment["compile_seconds"] == 100.5
    assert 6 <= training["budget"]["trained_seconds"] < 8
    assert "--compile" not in training["command"] and training["recipe"]["compile"] == "default"
    # auto: compiled on CUDA only, so not here.
    models.clear()
    train(quick_args(mini_collection, tmp_path, epochs=1, output=tmp_path / "c"))
    assert models == ["CifarVGG16"] * 2
    assert json.loads((tmp_path / "c" / "bundle.json").read_text())["training"]["environment"]["compiled"] is False


@pytest.mark.parametrize(("options", "message"), [
    (("--ema-decay", "1"), "--ema-decay must be at least 0 and below 1"),
    (("--ema-decay", "0.9", "--ema-every", "0"), "--ema-every at least 1"),
    (("--ema-decay", "0.9", "--swa-epochs", "1"), "cannot be combined with --swa-epochs"),
    (("--sam-rho", "-0.1"), "--sam-rho, --warmup-epochs and --profile-steps must be at least 0"),
    (("--warmup-epochs", "-1"), "--sam-rho, --warmup-epochs and --profile-steps must be at least 0"),
    (("--test-every", "0"), "--test-every at least 1"),
])
def test_training_options_no_run_can_use_are_refused_before_anything_loads(
        tmp_path: Path, options: tuple[str, ...], message: str) -> None:
    args = tiny_training_args(tmp_path / "no-collection", tmp_path, *options, epochs=2)
    with pytest.raises(TrainingError, match=message):
        train(args)


def test_a_checkpoint_whose_random_stream_was_drawn_on_another_kind_of_device_is_refused(
        tmp_path: Path, mini_collection: Path) -> None:
    train(quick_args(mini_collection, tmp_path, epochs=1, output=tmp_path / "a"))
    path = tmp_path / "train" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's (Philox) state
    torch.save(state, path)
    with pytest.raises(TrainingError, match="--resume: the checkpoint's random stream was drawn on another kind"):
        train(quick_args(mini_collection, tmp_path, "--resume", epochs=2, output=tmp_path / "b"))
