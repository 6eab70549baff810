"""The loss terms `cbir train` adds to label-smoothed cross-entropy: batch-hard triplet and distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_hard_triplet_loss(embedding: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on cosine distance."""
    normalised = F.normalize(embedding.float(), dim=1)
    distance = 1.0 - normalised @ normalised.T
    same = labels[:, None] == labels[None, :]
    hardest_positive = (distance * same).max(dim=1).values
    hardest_negative = distance.masked_fill(same, float("inf")).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                      temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): KL divergence from the teachers' averaged softened probabilities to the
    student's, times T² so its gradients keep their scale as the temperature changes."""
    target = torch.stack([(t.float() / temperature).softmax(dim=1) for t in teacher_logits]).mean(dim=0)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature ** 2
