"""Causal language modelling: per-sequence token losses, measurements and curvature.

Outputs are token logits (B, T, V); targets are token labels (B, T) with ``IGNORE_INDEX``
(-100, Hugging Face's convention) at positions that are not trained on: padding (rows batched
from dicts get -100 wherever ``attention_mask`` is 0, see ``gradients.data``), prompts, or
anything the user masked. With ``shift=True`` (Hugging Face's convention, labels = input ids)
the logits at position t predict the label at t + 1.

Per sequence, with n the number of target tokens and CE_t the token cross-entropy:

* loss: sum_t CE_t (``reduction="sum"``), sum_t CE_t / n (``"mean"``), or sum_t CE_t / c for
  a number c. Hugging Face's causal-LM loss averages over all target tokens of a batch: with
  sequences of equal target count that is ``"mean"``; with varied counts it is the sum
  divided by the batch's mean count, which ``reduction=<mean target tokens per sequence>``
  matches in expectation. The reduction must be the one the model was trained with; when it
  is not given (``CausalLMTask()``, the task name ``"causal_lm"``), ``"mean"`` is assumed, as
  the Trainer does, with a warning (``trajectory.hf_trainer.trainer_loss_reduction`` reads it
  from a Trainer run).
* measurements: ``"log_prob"`` (default): sum_t log p(y_t | y_<t), the log-probability of the
  target tokens; label only a completion's tokens (``mask_prompt``) to measure
  log p(completion | prompt). ``"loss"``: the training loss. ``"margin"``: sum_t
  [z_t,y_t - logsumexp_{v != y_t} z_t,v], a log-odds for a chosen token when one position
  is labelled (``target_token_labels``). Scores are > 0 when the training row raises the
  measurement (for ``"loss"``: harmful rows).

Curvature: the loss Hessian w.r.t. the logits is block diagonal, s (diag p_t - p_t p_t^T) per
target position with s = 1, 1/n or 1/c. The exact factor has T x V rows per sequence (small
vocabularies only); the sampled one (the default, ``default_curvature``) draws one
pseudo-label y_t ~ p_t per position and is the single column sqrt(s) sum_t (p_t - e_{y_t}):
the draws are independent with mean zero, so the cross terms vanish in expectation and
E[v v^T] is the exact block-diagonal Hessian (unbiased).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch

from source_proj.errors import InputError
from source_proj.gradients.data import IGNORE_INDEX
from source_proj.gradients.tasks import (
    LossFn,
    Task,
    exponential_noise,
    integer_labels,
    softmax_factor,
    softmax_pseudo_gradient,
)

MEASUREMENTS = ("log_prob", "loss", "margin")


def token_targets(logits: torch.Tensor, labels: torch.Tensor, shift: bool, ignore_index: int = IGNORE_INDEX):
    """(logits (B, T', V), labels (B, T'), mask (B, T') bool) aligned for next-token loss."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise InputError(
            f"causal-LM task: expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    return logits, torch.where(mask, labels, 0).long(), mask


def mask_prompt(labels: torch.Tensor, prompt_lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Labels (B, T) with the first ``prompt_lengths[i]`` tokens of row i set to -100, so
    that ``"log_prob"`` measures log p(completion | prompt) (with ``shift=True`` the first
    completion token is predicted from the last prompt token)."""
    lengths = torch.as_tensor(prompt_lengths, device=labels.device)[:, None]
    return torch.where(torch.arange(labels.shape[1], device=labels.device)[None, :] < lengths, IGNORE_INDEX, labels)


def target_token_labels(length: int, positions: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """Labels (B, length), -100 except ``tokens[i]`` at ``positions[i]`` (the position of the
    predicted token, i.e. after the shift): ``"margin"`` then measures that token's log-odds."""
    labels = torch.full((len(positions), length), IGNORE_INDEX, dtype=torch.long)
    labels[torch.arange(len(positions)), torch.as_tensor(positions)] = torch.as_tensor(tokens, dtype=torch.long)
    return labels


@dataclass(frozen=True)
class CausalLMTask(Task):
    """Next-token cross-entropy per sequence (see the module docstring).

    Attributes:
        reduction: "sum", "mean" (over the sequence's target tokens) or a positive number
            dividing the sum: as the model was trained. None (default): "mean", what the
            Hugging Face Trainer minimises, with a warning that it was assumed.
        measure: "log_prob" (default), "loss" or "margin".
        shift: logits at t predict the label at t + 1 (labels = input ids).
        ignore_index: the label of positions not trained on.
    """

    loss: LossFn = field(init=False, repr=False)
    measurement: LossFn = field(init=False, repr=False)
    name: str = "causal_lm"
    reduction: str | float | None = None
    measure: str = "log_prob"
    shift: bool = True
    ignore_index: int = IGNORE_INDEX
    default_curvature: ClassVar[str] = "sampled"

    def __post_init__(self) -> None:
        reduction = self.reduction
        if reduction is None:
            warnings.warn(
                "causal-LM task: reduction not given, assuming 'mean' (each sequence's mean token loss), as the Hugging "
                "Face Trainer minimises the mean token loss of a batch. Pass CausalLMTask(reduction='sum') if the model "
                "was trained on summed token losses (trajectory.hf_trainer.trainer_loss_reduction reads a Trainer run's)",
                stacklevel=3,
            )
            reduction = "mean"
            object.__setattr__(self, "reduction", reduction)
        if isinstance(reduction, str):
            if reduction not in ("sum", "mean"):
                raise InputError(f"reduction must be 'sum', 'mean' or a positive number, got {self.reduction!r}")
        elif isinstance(reduction, bool) or not (math.isfinite(float(reduction)) and float(reduction) > 0):
            raise InputError(f"reduction must be 'sum', 'mean' or a positive number, got {self.reduction!r}")
        if self.measure not in MEASUREMENTS:
            raise InputError(f"measure must be one of {MEASUREMENTS}, got {self.measure!r}")
        object.__setattr__(self, "loss", self.sequence_loss)
        measurement = {"log_prob": self.log_prob, "loss": self.sequence_loss, "margin": self.margin}[self.measure]
        object.__setattr__(self, "measurement", measurement)
        if self.name == "causal_lm":  # stores compare names: say what changes the features
            object.__setattr__(self, "name", f"causal_lm(reduction={self.reduction}, shift={self.shift})")

    def check_targets(self, targets: torch.Tensor, n_outputs: int, first_row: int = 0) -> None:
        """Labels must be integer token ids (B, T), ``ignore_index`` at positions not trained
        on, and every sequence must keep at least one target token (after the shift): one
        without has no loss and no measurement, so it would score zero against every row."""
        targets = integer_labels(targets, "causal-LM labels must be integer token ids", first_row)
        if targets.ndim != 2:
            raise InputError(f"causal-LM labels must be (sequences, tokens), got shape {tuple(targets.shape)}")
        counted = targets[:, 1:] if self.shift else targets
        negative = (counted < 0) & (counted != self.ignore_index)
        if negative.any():
            rows = (negative.any(dim=1).nonzero()[:, 0][:10] + first_row).tolist()
            raise InputError(
                f"causal-LM labels of rows {rows} hold negative token ids {counted[negative][:10].tolist()} "
                f"(only {self.ignore_index}, the ignore index, may be negative)"
            )
        empty = (counted == self.ignore_index).all(dim=1)
        if empty.any():
            rows = (empty.nonzero()[:, 0][:10] + first_row).tolist()
            raise InputError(
                f"causal-LM rows {rows} have no target token: every label{' after the first' if self.shift else ''} "
                f"is {self.ignore_index} (the ignore index); keep at least one token per sequence, or drop those rows"
            )

    def _scale(self, mask: torch.Tensor) -> torch.Tensor:
        """s per sequence (B,): the loss is s * sum_t CE_t."""
        if self.reduction == "sum":
            return torch.ones(mask.shape[0], dtype=torch.float64, device=mask.device)
        if self.reduction == "mean":
            return 1.0 / mask.sum(dim=1).clamp_min(1).to(torch.float64)
        number = cast(float, self.reduction)  # neither "sum" nor "mean": a positive number (__post_init__)
        return torch.full((mask.shape[0],), 1.0 / float(number), dtype=torch.float64, device=mask.device)

    def _token_log_probs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels, mask = token_targets(outputs, targets, self.shift, self.ignore_index)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]
        return torch.where(mask, logp, 0.0), mask

    def sequence_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) the training loss of each sequence."""
        logp, mask = self._token_log_probs(outputs, targets)
        return -logp.sum(dim=1) * self._scale(mask).to(logp.dtype)

    def log_prob(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) sum of log p(y_t | y_<t) over each sequence's target tokens."""
        return self._token_log_probs(outputs, targets)[0].sum(dim=1)

    def margin(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) sum over target positions of z_y - logsumexp(z without y)."""
        logits, labels, mask = token_targets(outputs, targets, self.shift, self.ignore_index)
        own = logits.gather(-1, labels[..., None])[..., 0]
        own_mask = labels[..., None] == torch.arange(logits.shape[-1], device=logits.device)  # vmap-safe one-hot
        others = logits.masked_fill(own_mask, -math.inf)
        return torch.where(mask, own - torch.logsumexp(others, dim=-1), 0.0).sum(dim=1)

    def _positions(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the predicting positions (B, T', V), weight sqrt(s) * mask (B, T'))."""
        logits, _, mask = token_targets(outputs, targets, self.shift, self.ignore_index)
        return logits, mask.to(torch.float64) * self._scale(mask).sqrt()[:, None]

    def _full_length(self, per_position: torch.Tensor) -> torch.Tensor:
        """Pad (B, T', ...) per-position values back to the T output positions (zeros at the
        last position under the shift)."""
        if not self.shift:
            return per_position
        pad = torch.zeros_like(per_position[:, :1])
        return torch.cat([per_position, pad], dim=1)

    def hessian_factor(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A (B, T*V, T*V): block diagonal, sqrt(s) (diag sqrt p_t - p_t sqrt(p_t)^T) at target positions."""
        logits, weight = self._positions(outputs, targets)
        blocks = self._full_length(softmax_factor(logits) * weight[..., None, None])  # (B, T, V, V)
        batch, length, vocab = blocks.shape[:3]
        eye = torch.eye(length, dtype=blocks.dtype, device=blocks.device)
        full = torch.einsum("btvw,ts->btvsw", blocks, eye).reshape(batch, length * vocab, length * vocab)
        return full.to(outputs.dtype)

    def sampling_noise(
        self, targets: torch.Tensor, output_shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Exp(1) noise (B, T', V) for one pseudo-label per target position (none drawn at
        padding or other ignored positions)."""
        logits, _, mask = token_targets(torch.empty(output_shape, device="meta"), targets, self.shift, self.ignore_index)
        return exponential_noise(tuple(logits.shape), generator, where=mask)

    def sampled_columns(self, outputs: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One column (B, T*V, 1): sqrt(s) sum_t (p_t - e_{y_t}), y_t ~ p_t at target positions."""
        logits, weight = self._positions(outputs, targets)
        draws = softmax_pseudo_gradient(logits, noise) * weight[..., None]
        column = self._full_length(torch.where(weight[..., None] > 0, draws, 0.0))
        return column.reshape(outputs.shape[0], -1, 1).to(outputs.dtype)
