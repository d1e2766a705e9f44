"""The negative ELBO of a Pyro model/guide pair, by ``Trace_ELBO`` or computed directly (:class:`ELBOLoss`).

:class:`~pyro_scmodels.infer.SVITrainer` minimises it on the package's one training loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import pyro
import torch
from pyro.infer import Trace_ELBO

from ._stacklevel import user_stacklevel
from .distributed import LocalScale

logger = logging.getLogger(__name__)


class ELBOLoss(torch.nn.Module):
    """The negative ELBO of a model/guide pair as a module's forward (what DDP wraps).

    ``DistributedDataParallel`` averages gradients over ranks when the loss comes out of a
    module's ``forward``; holding the model and guide as submodules gives it every parameter.

    Pyro's ``Trace_ELBO`` defines the loss. A model and guide whose classes declare
    ``direct_elbo = True`` (RegularizedVI's and RegularizedMultimodalVI's do; a subclass must
    declare it again) also compute it without Pyro's effect handlers: ``guide.draw`` gives the
    draws and log q, ``model.log_joint`` gives log p. At a minibatch of 128 cells most of a step's
    Python time is Pyro's tracing, and on a GPU that time is the step. The first call computes both
    from the same random numbers and takes the direct form only if the two losses agree
    (:meth:`_direct_agrees`); otherwise it warns and keeps ``Trace_ELBO``. Once taken, every call
    uses it, the first included.

    With :meth:`use_compiled` the direct form of a training step runs through ``torch.compile``
    (fused kernels instead of several hundred small operations a step); the check against
    ``Trace_ELBO`` and the loss without gradients (validation) stay uncompiled.

    Parameters
    ----------
    model, guide
        Callables ``model(batch, n_obs, kl_weight)`` and ``guide(batch, n_obs, kl_weight)``.
    """

    #: relative difference of the two losses above which the direct form is not used
    AGREEMENT_RTOL = 1e-4

    def __init__(self, model, guide):
        super().__init__()
        self.model, self.guide = model, guide
        self.elbo = Trace_ELBO()
        self.checked = False  # whether Pyro has checked the model and guide (on the first call)
        self.direct = all(declares_direct_elbo(m) for m in (model, guide))
        self.compiled_loss = None  # direct_loss through torch.compile, while use_compiled(True)

    def forward(self, batch: dict, n_obs: int, kl_weight: float, local_factor: float = 1.0) -> torch.Tensor:
        """Negative ELBO per cell of the ``n_obs``-cell dataset; the cell plate's terms times ``local_factor``.

        Pyro's checks of the model against the guide (matching sites, shapes, a NaN or Inf warning per
        site) run on the first call only, when Pyro's validation is on: the structure is the same for
        every minibatch, and on a GPU each per-site check waits for the device. The training loop checks
        every step's loss and gradient.
        """
        if self.direct and not self.checked:
            self.direct = self._direct_agrees(batch)
        if self.direct and self.compiled_loss is not None and torch.is_grad_enabled():
            return self.compiled_step_loss(batch, n_obs, kl_weight, local_factor)
        if self.direct:
            return self.direct_loss(batch, n_obs, kl_weight, local_factor)
        return self.trace_loss(batch, n_obs, kl_weight, local_factor)

    def _direct_agrees(self, batch: dict) -> bool:
        """Whether the direct form gives Trace_ELBO's loss on ``batch``, from the same random numbers.

        Both are computed without gradients, with the dataset size set to the minibatch's and a KL
        weight of 0.5: at the real dataset size the global sites' terms are a tiny share of a per-cell
        loss, and a wrong global term could pass. The random generators are put back afterwards, so
        the step that follows draws what it would have drawn without the check: a run that resumes
        from a checkpoint (and checks at its first step) follows the uninterrupted run.
        """
        generators = _generators(batch["index"].device)
        before = [g.get_state() for g in generators]
        n_cells, kl_weight = int(batch["index"].shape[0]), 0.5
        with torch.no_grad():
            traced = float(self.trace_loss(batch, n_cells, kl_weight))
            for generator, state in zip(generators, before):
                generator.set_state(state)
            direct = float(self.direct_loss(batch, n_cells, kl_weight))
        for generator, state in zip(generators, before):
            generator.set_state(state)
        if not math.isfinite(traced):
            # nothing to compare (the loop reports a non-finite loss itself); compare again at the next call
            self.checked = False
            return True
        if abs(direct - traced) <= self.AGREEMENT_RTOL * max(1.0, abs(traced)):
            return True
        warnings.warn(
            f"{type(self.model).__name__}.log_joint and {type(self.guide).__name__}.draw give a loss of "
            f"{direct:.6g} where Pyro's Trace_ELBO gives {traced:.6g} on the same minibatch and draws; training "
            "uses Trace_ELBO. A subclass that changes the model's sites should not declare direct_elbo = True.",
            stacklevel=user_stacklevel(),
        )
        return False

    def trace_loss(self, batch: dict, n_obs: int, kl_weight: float, local_factor: float = 1.0) -> torch.Tensor:
        """The loss by Pyro's ``Trace_ELBO`` (its model/guide checks only on the first call)."""
        checks = pyro.validation_enabled(False) if self.checked else contextlib.nullcontext()
        scale = LocalScale(local_factor) if local_factor != 1.0 else contextlib.nullcontext()
        # the data were validated once at setup; per-step support checks only cost time
        with checks, pyro.settings.context(validate_distributions_pyro=False, validate_distributions_torch=False), scale:
            loss = self.elbo.differentiable_loss(self.model, self.guide, batch, n_obs, kl_weight) / n_obs
        self.checked = True
        return loss

    def direct_loss(self, batch: dict, n_obs: int, kl_weight: float, local_factor: float = 1.0) -> torch.Tensor:
        """The same loss from ``guide.draw`` and ``model.log_joint``, without Pyro's effect handlers."""
        with pyro.settings.context(validate_distributions_pyro=False, validate_distributions_torch=False):
            values, log_q = self.guide.draw(batch, n_obs, kl_weight, local_factor)
            return (log_q - self.model.log_joint(values, batch, n_obs, kl_weight, local_factor)) / n_obs

    def use_compiled(self, enabled: bool) -> None:
        """Compute training steps' direct loss through ``torch.compile`` (``enabled``) or eagerly.

        Call :func:`check_compile_works` for the device first. A model and guide whose loss is
        ``Trace_ELBO`` (no direct form) are not compiled: Pyro's effect handlers do not trace.
        """
        if not enabled:
            self.compiled_loss = None
        elif self.compiled_loss is None:
            logger.info("compile=True: the first training step compiles the loss (11-50 s on 2 CPU cores; less with "
                        "torch's kernel cache filled).")
            # dynamic: the minibatch's cells and stored counts vary (the last minibatch, sparse rows);
            # fallback_random: the same draws as the eager form, so a seed reproduces its run and a resumed
            # run follows the uninterrupted one
            self.compiled_loss = torch.compile(self.direct_loss, dynamic=True, options={"fallback_random": True})

    def compiled_step_loss(self, batch: dict, n_obs: int, kl_weight: float, local_factor: float = 1.0) -> torch.Tensor:
        """:meth:`direct_loss` through the compiled function (:meth:`use_compiled`)."""
        # each model (its genes, covariates, layers) is one more compiled version of the same code: torch's
        # default limit of 8 would send a session's third or fourth model back to the eager form
        with torch._dynamo.config.patch(recompile_limit=COMPILED_VERSIONS):
            return self.compiled_loss(batch, n_obs, kl_weight, local_factor)


class CompileUnavailableError(RuntimeError):
    """``compile=True`` was asked for, and ``torch.compile`` cannot build kernels on this machine."""


#: compiled versions of the loss kept per process (every model trained with compile=True adds two or three)
COMPILED_VERSIONS = 64
_COMPILE_PROBES: dict[str, str | None] = {}  # device type -> None (torch.compile works) or why it failed


def check_compile_works(device: torch.device) -> None:
    """Raise a :class:`CompileUnavailableError` that says what to install when ``torch.compile`` cannot build kernels on ``device``.

    A two-operation function is compiled once per process and device type (a few seconds): it needs
    a C++ compiler on the CPU and triton on a GPU, which a missing toolchain would otherwise report
    only after the model's own compilation.
    """
    kind = torch.device(device).type
    if kind not in _COMPILE_PROBES:
        try:
            probe = torch.compile(lambda x: torch.lgamma(x * 2.0 + 1.0).sum(), dynamic=False)
            probe(torch.ones(3, device=device))
            _COMPILE_PROBES[kind] = None
        except Exception as err:  # any failure of the toolchain: the message below names it
            _COMPILE_PROBES[kind] = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    failure = _COMPILE_PROBES[kind]
    if failure is not None:
        need = "a C++ compiler (g++ or clang++ on the PATH, or named by the CXX variable)" if kind == "cpu" else "triton"
        raise CompileUnavailableError(f"compile=True: torch.compile does not work on {kind} here ({failure}). "
                                      f"It needs {need}; install it, or train with compile=False (the default).")


def declares_direct_elbo(module) -> bool:
    """Whether ``module``'s own class declares ``direct_elbo = True``, and so does every part it delegates to.

    A subclass does not inherit the declaration. A module built of parts (the multimodal model's blocks)
    lists them in ``direct_elbo_parts()``: an edited block makes the whole loss use ``Trace_ELBO``.
    """
    if not vars(type(module)).get("direct_elbo", False):
        return False
    parts = getattr(module, "direct_elbo_parts", None)
    return parts is None or all(declares_direct_elbo(part) for part in parts())


def _generators(device: torch.device) -> list[torch.Generator]:
    """The default random generators a step draws from: the CPU's, and the device's on a GPU."""
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()])
    return generators
