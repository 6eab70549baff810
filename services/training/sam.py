"""Sharpness-aware minimisation (Foret et al., 2021) as a wrapper around `cbir train`'s optimizer.

A step takes its gradient not at the weights w but at w + ε, ε = ρ·g/‖g‖ (the direction that raises the
loss fastest, ρ far): two forward and backward passes a step, for flatter minima. The wrapped optimizer
then updates w itself with that gradient.

    sam = SharpnessAwareMinimization(optimizer, rho=0.05)
    loss_of(batch).backward()     # g at w
    sam.ascend()                  # w → w + ε
    optimizer.zero_grad(); loss_of(batch).backward()   # the gradient at w + ε
    sam.step()                    # back to w, then the optimizer's update
"""

from __future__ import annotations

import torch


class SharpnessAwareMinimization:
    """Moves the optimizer's parameters to w + ε (`ascend`) and back before its update (`step`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rho: float) -> None:
        if rho <= 0:
            raise ValueError(f"rho must be above 0, not {rho}")
        self.optimizer = optimizer
        self.rho = rho
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its value at w)

    @torch.no_grad()
    def ascend(self) -> None:
        """Move every parameter with a gradient by ρ·g/‖g‖, ‖g‖ the norm of all gradients together, keeping
        a copy of w. The norm stays on the device: nothing here waits for the GPU."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        scale = self.rho / (norm + 1e-12)
        self._saved = [(p, p.detach().clone()) for p in params]
        for p in params:
            p.add_((p.grad.float() * scale).to(p.dtype))

    @torch.no_grad()
    def step(self) -> None:
        """Return the parameters to w exactly, then let the optimizer update them with the gradients they hold."""
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved = []
        self.optimizer.step()
