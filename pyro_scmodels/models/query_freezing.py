"""Freezing a reference inside a query model: only the levels new in the query learn.

How the reference is frozen, and why this way. The package's one training loop builds Adam over
every parameter of the model and guide. A parameter with ``requires_grad=False`` never gets a
gradient, and torch's Adam skips a parameter without one: no step, no weight decay, no moment
update, so a frozen value stays bit-identical and the loop needs no change. (Hooks that zero part
of a gradient would not do: Adam's weight decay would still move that part.) ``requires_grad`` is
per tensor, but a per-level table (ambient: levels x genes) mixes reference and new levels, so its
guide is replaced by :class:`NewLevelsSiteGuide`, whose reference rows are a buffer and whose new
rows are its only parameter.
"""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import torch

from ..nn import GaussianEncoder
from ..pyro_modules import PositiveSiteGuide, ProfileAmountGuide
from .query_networks import new_network_parameters
from .regularizedvi_dims import SITE_COVARIATE_ROLES


# --- the frozen reference rows ---------------------------------------------------------------------------------------
def _full_tables(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of :class:`NewLevelsSiteGuide`: store whole tables, as a plain site guide does."""
    for name in module.table_names:
        key = f"{prefix}{name}_unconstrained"
        state_dict[key] = getattr(module, f"fixed_{name}_unconstrained").index_copy(0, module.new_rows, state_dict[key].detach())


def _new_rows_only(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of :class:`NewLevelsSiteGuide`: keep only the new rows of a whole table."""
    for name in module.table_names:
        key = f"{prefix}{name}_unconstrained"
        if key in state_dict and state_dict[key].shape == getattr(module, f"fixed_{name}_unconstrained").shape:
            state_dict[key] = state_dict[key][module.new_rows.to(state_dict[key].device)]


def _hold_reference_rows(module, site, names: tuple[str, ...], new_rows: torch.Tensor) -> None:
    """Give ``module`` the whole tables ``names`` of ``site`` as buffers, its own parameters the new rows.

    The parameters ``<name>_unconstrained`` of ``module`` (new rows only) start at ``site``'s values; the
    hooks make its ``state_dict`` hold whole tables, as ``site``'s does.
    """
    module.table_names = tuple(names)
    module.register_buffer("new_rows", new_rows, persistent=False)
    for name in names:
        unconstrained = getattr(site, f"{name}_unconstrained").detach()
        with torch.no_grad():
            getattr(module, f"{name}_unconstrained").copy_(unconstrained[new_rows])
        # unconstrained: what the state_dict holds; constrained: what the guide samples with
        module.register_buffer(f"fixed_{name}_unconstrained", unconstrained.clone(), persistent=False)
        module.register_buffer(f"fixed_{name}", getattr(site, name).detach().clone(), persistent=False)
    module.register_state_dict_post_hook(_full_tables)
    module.register_load_state_dict_pre_hook(_new_rows_only)


class NewLevelsSiteGuide(PositiveSiteGuide):
    """Guide of a per-level global site whose reference levels are fixed: only the new levels learn.

    The table (levels x features) is the fixed table, a buffer, with the rows of the new levels
    replaced by this guide's parameter. Its ``state_dict`` holds the whole table under the names of
    a plain :class:`~pyro_scmodels.pyro_modules.PositiveSiteGuide`, so a saved query model loads
    as an ordinary model and a training checkpoint resumes.

    Parameters
    ----------
    site
        The site's guide, holding the reference's values in the rows of known levels.
    new_rows
        Rows of the levels new in the query.
    """

    def __init__(self, site: PositiveSiteGuide, new_rows):
        new_rows = torch.as_tensor(np.asarray(new_rows), dtype=torch.long)
        super().__init__(site.median()[new_rows], site.family)
        _hold_reference_rows(self, site, ("value",) if site.family == "map" else ("loc", "scale"), new_rows)

    def table(self, name: str) -> torch.Tensor:
        """The whole table ``name`` (``"value"``, ``"loc"`` or ``"scale"``), new rows learned, the rest fixed."""
        return getattr(self, f"fixed_{name}").index_copy(0, self.new_rows, getattr(self, name))

    def distribution(self) -> dist.Distribution:
        """``Delta`` or ``LogNormal`` over the whole table."""
        if self.family == "map":
            return dist.Delta(self.table("value"))
        return dist.LogNormal(self.table("loc"), self.table("scale"))

    def median(self) -> torch.Tensor:
        """The point estimate, or the LogNormal median (detached), of every level."""
        return (self.table("value") if self.family == "map" else self.table("loc").exp()).detach()


class NewLevelsAmountGuide(ProfileAmountGuide):
    """Amount x profile with the reference levels' amounts fixed: only the new levels' amounts learn.

    For a reference trained with a known ambient profile (:class:`~pyro_scmodels.pyro_modules.ProfileAmountGuide`).
    Every level's profile is the one given; the reference levels' amounts are a buffer, and the new
    levels' amounts are this guide's parameter. Its ``state_dict`` holds the whole amount table under
    the plain guide's names, so a saved query model loads as an ordinary model.

    Parameters
    ----------
    site
        The site's guide, holding the reference's amounts in the rows of known levels.
    new_rows
        Rows of the levels new in the query.
    """

    def __init__(self, site: ProfileAmountGuide, new_rows):
        new_rows = torch.as_tensor(np.asarray(new_rows), dtype=torch.long)
        amount = site.amount.detach()
        super().__init__(site.profile, amount[new_rows].reshape(-1))
        self.profile.copy_(site.profile)  # as the reference holds it (the constructor would normalise it again)
        _hold_reference_rows(self, site, ("amount",), new_rows)

    @property
    def value(self) -> torch.Tensor:
        """Every level's amount (new ones learned, the rest fixed) times its profile."""
        return self.fixed_amount.index_copy(0, self.new_rows, self.amount) * self.profile


def freeze_reference(module: torch.nn.Module, rows: dict[str, np.ndarray], freeze_encoder: bool, freeze_decoder: bool) -> None:
    """Fix every reference parameter of a query module; new levels, the networks' columns of new categories (and
    optionally the whole networks) learn.

    Parameters
    ----------
    module
        The query model's module (``model`` and ``guide``), holding the reference's values.
    rows
        Per covariate role, the reference row of each query level (-1 for a level new in the query).
    freeze_encoder
        Keep the z and library encoders fixed.
    freeze_decoder
        Keep the decoder fixed.
    """
    module.requires_grad_(False)
    for parameter in new_network_parameters(module):  # the networks' columns of categories new to the reference
        parameter.requires_grad_(True)
    guide = module.guide
    for name, child in list(guide.named_children()):
        role = SITE_COVARIATE_ROLES.get(name)
        if role is None or not isinstance(child, PositiveSiteGuide):
            continue
        new_rows = np.flatnonzero(rows[role] < 0)
        if new_rows.size:
            # a known profile (ambient_profile=): only the new levels' amounts learn, their profiles stay as given
            wrapper = NewLevelsAmountGuide if isinstance(child, ProfileAmountGuide) else NewLevelsSiteGuide
            setattr(guide, name, wrapper(child, new_rows))
    if not freeze_encoder:
        for child in guide.children():
            if isinstance(child, GaussianEncoder):  # the z and the library encoders
                child.requires_grad_(True)
    if not freeze_decoder:
        module.model.decoder.requires_grad_(True)
