"""Building blocks shared by the Pyro model/guide modules of every model.

- :class:`LocalPyroModule`: a ``PyroModule`` whose parameters live in the module (its
  ``state_dict``), never in Pyro's global parameter store, so two models in one session never
  share parameters by name and ``torch.save`` of a module saves everything.
- :class:`PositiveSiteGuide`: the guide of one positive global site, either a point estimate
  (``Delta``, MAP) or a ``LogNormal`` mean-field factor.
"""

from __future__ import annotations

import contextlib
import weakref

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

GUIDE_FAMILIES = ("map", "lognormal")


def refuse_outer_plates(module: torch.nn.Module) -> None:
    """Raise when the model or guide runs inside a plate of the caller's (Pyro's vectorised particles or samples).

    The modules draw one set of global sites per call: under ``Trace_ELBO(vectorize_particles=True)`` or
    ``Predictive(..., parallel=True)`` the particle dimension of the global sites lined up with the cells' plate, so
    the ELBO came out about ``num_particles`` times too large without an error.
    """
    outer = [frame.name for frame in pyro.poutine.runtime.get_plates()]
    if outer:
        raise NotImplementedError(
            f"{type(module).__name__} ran inside the plate(s) {outer}: the package's models draw one sample per call, "
            "and do not broadcast over Pyro's vectorised particles or samples. Use Trace_ELBO(num_particles=n) without "
            "vectorize_particles, or Predictive(..., parallel=False)."
        )


class LocalPyroModule(PyroModule):
    """A ``PyroModule`` that is built and always runs with module-local parameters."""

    def __init__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            super().__init__(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)


class PositiveSiteGuide(LocalPyroModule):
    """Guide of a positive global site: ``Delta`` (``"map"``) or ``LogNormal`` (``"lognormal"``).

    Parameters
    ----------
    init
        Initial value (the point estimate, or the LogNormal median).
    family
        ``"map"`` or ``"lognormal"``.
    init_scale
        Initial LogNormal scale (``"lognormal"`` only).
    """

    def __init__(self, init: torch.Tensor, family: str = "map", init_scale: float = 0.1):
        super().__init__()
        if family not in GUIDE_FAMILIES:
            raise ValueError(f"Guide family must be one of {GUIDE_FAMILIES}, got {family!r}.")
        self.family = family
        init = torch.as_tensor(init, dtype=torch.get_default_dtype())
        if family == "map":
            self.value = PyroParam(init.clone(), constraint=constraints.positive)
        else:
            self.loc = PyroParam(init.log().clone())
            self.scale = PyroParam(torch.full_like(init, init_scale), constraint=constraints.positive)

    def distribution(self) -> dist.Distribution:
        if self.family == "map":
            return dist.Delta(self.value)
        return dist.LogNormal(self.loc, self.scale)

    def forward(self, name: str) -> torch.Tensor:
        return pyro.sample(name, self.distribution())

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised draw and its log-density (0 for a point estimate), as :meth:`forward`'s site holds them."""
        q = self.distribution()
        value = q.rsample()
        return value, q.log_prob(value).sum()

    def median(self) -> torch.Tensor:
        """The point estimate, or the LogNormal median (detached)."""
        return (self.value if self.family == "map" else self.loc.exp()).detach()


class ProfileAmountGuide(PositiveSiteGuide):
    """Point estimate of a (categories x features) site written as amount x a fixed profile.

    ``value[e, g] = amount_e * profile[e, g]``: the shape of each row is given (e.g. the ambient
    profile measured in empty droplets, each row summing to 1) and only the amount per row is
    learned, which identifies the amount where the likelihood alone does not.

    Parameters
    ----------
    profile
        Rows x features, non-negative; each row is rescaled to sum to 1.
    init_amount
        Initial amount per row (rows,).
    """

    def __init__(self, profile: torch.Tensor, init_amount: torch.Tensor):
        LocalPyroModule.__init__(self)
        self.family = "map"
        profile = torch.as_tensor(profile, dtype=torch.get_default_dtype())
        self.register_buffer("profile", profile / profile.sum(-1, keepdim=True))
        init_amount = torch.as_tensor(init_amount, dtype=torch.get_default_dtype()).reshape(-1, 1)
        self.amount = PyroParam(init_amount.clone(), constraint=constraints.positive)

    @property
    def value(self) -> torch.Tensor:
        """The site's value, amount x profile."""
        return self.amount * self.profile


#: modules inside an :func:`evaluating` block: how many blocks hold each, and the modes to put back when the last ends
_EVALUATING: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in evaluation mode (no dropout) inside the block, each of its submodules back in its own mode after.

    The queries run in it: a query inside a user's own training loop left the modules in evaluation mode, and the
    steps after it trained without dropout. Blocks may overlap and end in any order (queries decoded side by side,
    as generators that end one by one): the modes found by the first are put back when the last ends.

    Parameters
    ----------
    module
        The module (with its submodules) to evaluate with.
    """
    held = _EVALUATING.get(module)
    if held is None:
        held = _EVALUATING[module] = [0, [(sub, sub.training) for sub in module.modules()]]
    held[0] += 1
    module.eval()
    try:
        yield module
    finally:
        held[0] -= 1
        if held[0] == 0:
            del _EVALUATING[module]
            for sub, mode in held[1]:
                sub.training = mode
