"""The training losses: distillation towards the teachers' averaged softened probabilities, batch-hard triplets."""

from __future__ import annotations

import pytest
import torch

from services.training.losses import batch_hard_triplet_loss, distillation_loss


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


def test_batch_hard_triplet_loss_is_zero_for_separated_classes() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert batch_hard_triplet_loss(separated, labels, margin=0.2).item() == pytest.approx(0.0)
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.01, 1.0]])
    assert batch_hard_triplet_loss(mixed, labels, margin=0.2).item() > 0.5
