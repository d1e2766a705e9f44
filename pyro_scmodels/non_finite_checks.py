"""Numeric guards of the training loop: the float32 default it computes in (:func:`require_float32_default`), and
for NaN/Inf the error it raises and the messages that name the culprit.

:class:`NonFiniteChecks` is a mixin of :class:`~pyro_scmodels.training.TrainingLoop`: when a loss or a gradient is
NaN or Inf, or the loss cannot be computed because a parameter is, it names the loss part, parameter or gradient
(:class:`~pyro_scmodels.infer.SVITrainer` adds the model and guide sites by overriding :meth:`~NonFiniteChecks.diagnose`).
It uses the loop's ``named_parameters``, ``minibatch_loss``, ``epoch`` and ``step``.
"""

from __future__ import annotations

import torch


class NonFiniteError(FloatingPointError):
    """Training produced NaN or Inf; the message names the loss part, site or parameter."""


class NonFiniteChecks:
    """The loop's checks for NaN and Inf, and the messages naming where they are (mixed into ``TrainingLoop``)."""

    def diagnose(self, where: str, parts: dict[str, torch.Tensor]) -> str:
        """The error message when ``where`` (the loss or the gradient) is NaN or Inf."""
        problems = [f"loss part {name!r}" for name, value in parts.items() if not torch.isfinite(torch.as_tensor(value)).all()]
        problems += self._parameter_problems()
        return self._message(where, problems)

    def _parameter_problems(self) -> list[str]:
        named = list(self.named_parameters())
        problems = [f"{name} (value)" for name, p in named if not torch.isfinite(p).all()]
        return problems + [f"{name} (gradient)" for name, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]

    def _message(self, where: str, problems: list[str], state: str = "is NaN or Inf") -> str:
        found = "; ".join(problems) or "no single part or parameter identified"
        return (
            f"Training stopped at epoch {self.epoch}, step {self.step}: {where} {state}. Non-finite: {found}. "
            "Try a lower learning rate (lr), a smaller gradient_clip, or check the input for extreme values."
        )

    def _checked_loss(self, item) -> tuple[torch.Tensor, dict]:
        """``minibatch_loss(item)``; a failure inside it caused by non-finite parameters is named as such.

        A NaN weight can stop the forward pass before there is a loss to check (a distribution refusing a
        NaN rate, a sampler refusing NaN probabilities): the error then names the parameters, as for a NaN loss.
        """
        try:
            return self.minibatch_loss(item)
        except (RuntimeError, ValueError) as err:
            problems = [p for p in self._parameter_problems() if p.endswith("(value)")]
            if not problems:
                raise
            raise NonFiniteError(self._message(
                "the loss", problems, f"could not be computed ({type(err).__name__}: {err}): parameters are NaN or Inf"
            )) from err


def require_float32_default() -> None:
    """Raise unless torch's default dtype is float32: the models' data, buffers and networks are float32, and under
    ``torch.set_default_dtype(torch.float64)`` the networks were built in float64 and the first step failed inside
    the encoder ("mat1 and mat2 must have the same dtype")."""
    if torch.get_default_dtype() != torch.float32:
        raise RuntimeError(f"torch's default dtype is {torch.get_default_dtype()}, and pyro_scmodels computes in "
                           "float32 (its data, buffers and networks): call torch.set_default_dtype(torch.float32) "
                           "before building or training a model.")
