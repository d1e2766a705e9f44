"""Priors are data: what a modeller edits.

A prior is a Pyro distribution. :class:`RegularizedPriors` collects the priors of the
regularised models; the model registers each prior's parameters as buffers (they move with the
device and are saved in the ``state_dict``) and rebuilds the distribution at every call::

    priors = RegularizedPriors(ambient=dist.Gamma(2.0, 50.0), regularize_ambient=True)
    model = RegularizedVI(adata, priors=priors)
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, fields

import pyro.distributions as dist
import torch
from torch import nn

from . import _constants as C
from . import _validation as V
from ._stacklevel import user_stacklevel


def _gamma(pair):
    return dist.Gamma(torch.tensor(pair[0]), torch.tensor(pair[1]))


@dataclass
class RegularizedPriors:
    """The priors of :class:`~pyro_scmodels.RegularizedVI` (and the multimodal model).

    Parameters
    ----------
    dispersion_rate
        Prior of the containment rate lambda_d (one per dispersion group), the rate of the
        Exponential prior on ``1/sqrt(theta)``. Default ``Gamma(9, 3)`` (mean 3).
    ambient
        Prior of the ambient background s (per ambient category and gene). Default
        ``Gamma(1, 100)`` (mean 0.01). Only counted in the ELBO when ``regularize_ambient``.
    feature_scaling
        Prior of the per-gene feature scaling y. Default ``Gamma(200, 200)`` (mean 1, sd 0.07).
    library_residual_weight
        Prior of the global weight w of the observed log library size in the library guide.
        Default ``Exponential(1)``.
    decoder_weight
        Prior on every decoder weight (not biases), or None for none. Default
        ``Normal(0, sqrt(5))``, the same as an L2 penalty of 0.1.
    regularize_ambient
        Count the ambient prior in the ELBO. Off by default, as in regularizedvi
        (``regularise_background=False``): the site is kept but its prior term is masked.
    """

    dispersion_rate: dist.Distribution = field(default_factory=lambda: _gamma(C.DISPERSION_RATE_PRIOR))
    ambient: dist.Distribution = field(default_factory=lambda: _gamma(C.AMBIENT_PRIOR))
    feature_scaling: dist.Distribution = field(default_factory=lambda: _gamma(C.FEATURE_SCALING_PRIOR))
    library_residual_weight: dist.Distribution = field(
        default_factory=lambda: dist.Exponential(torch.tensor(C.LIBRARY_RESIDUAL_WEIGHT_PRIOR))
    )
    decoder_weight: dist.Distribution | None = field(
        default_factory=lambda: dist.Normal(torch.tensor(0.0), torch.tensor(C.DECODER_WEIGHT_PRIOR_SCALE))
    )
    regularize_ambient: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self, saved: bool = False) -> "RegularizedPriors":
        """Check every prior (again: a field set after construction is checked when a model is built with it).

        Parameters
        ----------
        saved
            The priors of a saved model being loaded: a prior over part of the positive numbers, allowed before
            this check existed, warns instead of raising.

        Returns
        -------
        RegularizedPriors
            Itself.

        Raises
        ------
        TypeError
            A prior that is not a distribution.
        ValueError
            A prior with event dimensions, or (but for ``decoder_weight``) one that does not cover every positive
            number: its site is positive, and the guide's point estimate may take any positive value.
        """
        for f in fields(self):
            prior = getattr(self, f.name)
            if f.name == "regularize_ambient" or (f.name == "decoder_weight" and prior is None):
                continue
            if not isinstance(prior, torch.distributions.Distribution):
                raise V.ArgumentTypeError(f"RegularizedPriors.{f.name} must be a distribution, e.g. "
                                          f"{'dist.Normal(0., 1.)' if f.name == 'decoder_weight' else 'dist.Gamma(1., 100.)'}"
                                          f"; got {prior!r}.")
            if prior.event_shape != torch.Size():  # e.g. .to_event(1): a site's values are independent draws
                raise ValueError(f"RegularizedPriors.{f.name} must be a univariate distribution (parameters per gene or "
                                 f"category are fine, no event dimensions); got event_shape {tuple(prior.event_shape)}. "
                                 "Drop .to_event(...).")
            if f.name == "decoder_weight":
                continue
            negative = bool(prior.support.check(torch.tensor(-1.0)).any())
            # Uniform(0.95, 1.05) was accepted, and training failed once the estimate left the interval
            partial = not all(bool(prior.support.check(torch.tensor(v)).all()) for v in (1e-6, 1e6))
            if negative or partial:
                message = (f"RegularizedPriors.{f.name} must be a distribution over all positive numbers (its site is "
                           f"positive, and its estimate may take any positive value); {type(prior).__name__} has support "
                           f"{prior.support}. Use e.g. a Gamma or a LogNormal.")
                if negative or not saved:
                    raise ValueError(message)
                warnings.warn(f"{message} (A saved model with it still loads.)", UserWarning,
                              stacklevel=user_stacklevel())
        # set without __setattr__: the priors read back from a model (PriorsInUse) refuse assignments
        object.__setattr__(self, "regularize_ambient", V.boolean("regularize_ambient", self.regularize_ambient))
        return self

    def distributions(self) -> dict[str, dist.Distribution]:
        """The priors that are distributions, by site name (None entries left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.distributions.Distribution)
        }


class PriorsInUse(RegularizedPriors):
    """The priors a model trains with, read back from its buffers (``model.priors``): read-only.

    An assignment to a field (``model.priors.ambient = ...``) would change nothing the model does, so it is refused,
    naming the buffers to edit instead. Built without the checks of :class:`RegularizedPriors`: they were made when
    the model was built (and a saved model with a prior allowed then still reads back).
    """

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        where = ("model.module.model.priors, or model.module.model.block(m).priors for a multimodal model, e.g. "
                 f"{name}__rate.fill_(...)")
        fix = "build" if name == "regularize_ambient" else f"edit its buffers ({where}), or build"  # a flag: no buffer
        raise AttributeError(f"model.priors is read back from the model's buffers, so setting {name} would change "
                             f"nothing: {fix} a new model with priors=RegularizedPriors({name}=...).")

    def __repr__(self) -> str:
        return "RegularizedPriors" + super().__repr__()[len(type(self).__qualname__):]


def checked_priors(label: str, priors, saved: bool = False) -> "RegularizedPriors":
    """``priors`` if it is a :class:`RegularizedPriors`, checked again (:meth:`RegularizedPriors.validate`, ``saved``
    for a model being loaded); ``TypeError`` naming ``label`` otherwise."""
    if not isinstance(priors, RegularizedPriors):
        raise V.ArgumentTypeError(f"{label} must be a RegularizedPriors, got {type(priors).__name__}.")
    return priors.validate(saved)  # a field may have been set after construction


def priors_fingerprint(priors) -> str:
    """A text that changes whenever a prior's family, its parameter values or a flag changes.

    Parameters
    ----------
    priors
        A :class:`RegularizedPriors`, a dict of them (per modality), or None.

    Returns
    -------
    str
        Compared before a checkpoint is resumed: the checkpoint's prior buffers would otherwise silently
        replace the ones the model was built with.
    """
    if priors is None:
        return "None"
    if isinstance(priors, dict):
        return repr({name: priors_fingerprint(value) for name, value in sorted(priors.items())})
    return repr(_described(priors))


def _described(priors: RegularizedPriors) -> dict:
    """Each field as comparable values: a prior's family and parameter values, or the flag."""
    described = {}
    for f in fields(priors):
        value = getattr(priors, f.name)
        if isinstance(value, torch.distributions.Distribution):
            value = (type(value).__name__,
                     {k: v.detach().cpu().tolist() for k, v in distribution_parameters(value, f.name).items()})
        described[f.name] = value
    return described


def prior_record(priors) -> dict:
    """The priors as plain values, for an export's ``uns`` (torch's text of a distribution omits its parameters).

    Parameters
    ----------
    priors
        :class:`RegularizedPriors`, or a dict of them by modality.

    Returns
    -------
    dict
        Per prior its family (``"distribution"``) and parameters (a number, or a list per category or gene); the
        flags as booleans; unset fields left out.
    """
    if isinstance(priors, dict):
        return {name: prior_record(value) for name, value in priors.items()}
    record = {}
    for name, value in _described(priors).items():
        if isinstance(value, tuple):
            family, parameters = value
            record[name] = {"distribution": family, **parameters}
        elif value is not None:
            record[name] = value
    return record


def edited_fields(priors: RegularizedPriors) -> list[str]:
    """The fields of ``priors`` that differ from the defaults (a prior's family or values, or the flag)."""
    default = _described(RegularizedPriors())
    return [name for name, value in _described(priors).items() if value != default[name]]


def distribution_parameters(prior: torch.distributions.Distribution, name: str) -> dict[str, torch.Tensor]:
    """The tensor parameters from which ``type(prior)(**params)`` rebuilds ``prior``."""
    signature = inspect.signature(type(prior).__init__).parameters
    params = {}
    for key in prior.arg_constraints:
        if key not in signature:
            continue
        # plain distributions keep parameters in __dict__; transformed ones (HalfNormal, LogNormal) as properties
        value = prior.__dict__[key] if key in prior.__dict__ else getattr(prior, key, None)
        if value is not None:
            params[key] = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if not params:
        raise TypeError(
            f"Prior {name!r} must be a distribution with tensor parameters, e.g. dist.Gamma(2., 50.); "
            f"got {prior!r}."
        )
    return params


class PriorSet(nn.Module):
    """Holds prior hyperparameters as buffers and rebuilds the distributions on demand.

    ``prior_set["ambient"]`` returns ``dist.Gamma(concentration, rate)`` built from the buffers
    ``ambient__concentration`` and ``ambient__rate`` (on the module's device).
    """

    def __init__(self, priors: dict[str, torch.distributions.Distribution]):
        super().__init__()
        self._families: dict[str, tuple[type, list[str]]] = {}
        for name, prior in priors.items():
            params = distribution_parameters(prior, name)
            for key, value in params.items():
                self.register_buffer(f"{name}__{key}", value.clone())
            self._families[name] = (type(prior), list(params))

    def __contains__(self, name: str) -> bool:
        return name in self._families

    def __getitem__(self, name: str) -> torch.distributions.Distribution:
        family, keys = self._families[name]
        return family(**{key: getattr(self, f"{name}__{key}") for key in keys})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved buffer keeps its own shape: one edited per gene beside a scalar partner (ambient__rate per gene,
        # ambient__concentration scalar) is rebuilt per gene for both by the distribution, which load() builds from
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_values(self, where: str = "model.module.model.priors") -> None:
        """Refuse a buffer edited to a value its distribution cannot take: NaN, infinite, or outside the parameter's
        constraint (``arg_constraints``, e.g. a negative rate). Run before training, beside the shape check.

        Parameters
        ----------
        where
            How the user reaches these buffers, for the message.

        Raises
        ------
        ValueError
            Naming the ``RegularizedPriors`` field, the parameter, a bad value and the buffer.
        """
        for name, (family, keys) in self._families.items():
            constraints = family.arg_constraints  # a class attribute for torch's families (a property for a few)
            for key in keys:
                buffer = getattr(self, f"{name}__{key}").detach()
                constraint = constraints.get(key) if isinstance(constraints, dict) else None
                valid = torch.isfinite(buffer)
                if constraint is not None and not torch.distributions.constraints.is_dependent(constraint):
                    valid = valid & constraint.check(buffer)
                if bool(valid.all()):
                    continue
                bad = buffer[~valid]
                count = f" ({bad.numel()} of its {buffer.numel()} values)" if buffer.numel() > 1 else ""
                raise ValueError(
                    f"priors.{name}: {key} is {bad.reshape(-1)[0].item():g}{count}, which {family.__name__} cannot "
                    f"take (it must be finite{'' if constraint is None else f' and satisfy {constraint}'}). The buffer "
                    f"{where}.{name}__{key} was edited to it: fill it with a valid value, or build a new model with "
                    f"priors=RegularizedPriors({name}=...).")

    def distributions(self) -> dict[str, torch.distributions.Distribution]:
        """The priors as the buffers hold them now (edits included), on the CPU, by site name."""
        # not validated: a buffer edited to a value outside its constraint is reported, not raised on here
        return {name: family(**{key: getattr(self, f"{name}__{key}").detach().cpu().clone() for key in keys},
                             validate_args=False)
                for name, (family, keys) in self._families.items()}


def refuse_replaced_ambient_prior(priors, shaped_ambient: bool, where: str = "priors", warn: bool = False) -> None:
    """Refuse an edited ambient prior where ``ambient_shape_prior`` replaces it (the edit would change nothing).

    Parameters
    ----------
    priors
        :class:`RegularizedPriors` of one modality.
    shaped_ambient
        Whether the model samples the background from the shaped prior.
    where
        How the user reaches these priors, for the message.
    warn
        Warn instead (a saved model, built before the refusal existed, or trained on with such an edit).
    """
    if not shaped_ambient or "ambient" not in edited_fields(priors):
        return
    message = (f"The ambient prior in {where} was edited ({priors.ambient}), but ambient_shape_prior replaces it "
               "with Gamma(a, a / (m_e p_g)) centred on the pooled cells' profile, so the edit changes nothing")
    if warn:
        warnings.warn(message + ".", UserWarning, stacklevel=user_stacklevel())
        return
    raise ValueError(message + ". Build the model with one of them (set the shaped prior's concentration with "
                     "ambient_shape_prior=...).")


def warn_unused_ambient_prior(priors: RegularizedPriors, where: str = "priors") -> None:
    """Warn that an edited ambient prior is masked (it changes nothing in training) unless ``regularize_ambient``.

    Parameters
    ----------
    priors
        :class:`RegularizedPriors` of one modality, given to a model being built.
    where
        How the user gave them, for the message.
    """
    if priors.regularize_ambient or "ambient" not in edited_fields(priors):
        return
    warnings.warn(f"{where}.ambient was edited ({priors.ambient}), but regularize_ambient is False: the ambient prior is "
                  "masked (not counted in the ELBO), so the edit changes only prior predictive draws, not training. "
                  "Pass the same ambient= with regularize_ambient=True to train with it.",
                  UserWarning, stacklevel=user_stacklevel())


def check_prior_shapes(priors, dims) -> None:
    """Refuse a prior whose batch shape does not broadcast to its site's shape.

    Checked when a model is built, so that the error names the prior rather than a trace's shape mismatch.

    Parameters
    ----------
    priors
        :class:`RegularizedPriors` of one modality.
    dims
        That modality's sizes (:class:`~pyro_scmodels.models.regularizedvi_dims.RegularizedVIDims`).

    Raises
    ------
    ValueError
        Naming the prior, its batch shape and the site's shape.
    """
    sites = {"dispersion_rate": (dims.n_dispersion, 1), "library_residual_weight": ()}
    if dims.use_ambient:  # a modality without a site does not use its prior
        sites["ambient"] = (dims.n_ambient, dims.n_genes)
    if dims.use_feature_scaling:
        sites["feature_scaling"] = (dims.n_scaling, dims.n_genes)
    for name, shape in sites.items():
        prior = getattr(priors, name)
        try:
            fits = prior.batch_shape.numel() == 1 or torch.broadcast_shapes(prior.batch_shape, shape) == torch.Size(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"RegularizedPriors.{name} has batch shape {tuple(prior.batch_shape)}, which does not "
                             f"broadcast to its site's shape {shape} (categories x genes where it has them); give "
                             "scalar parameters, or parameters of that shape.")
