"""The per-feature global sites (ambient, feature scaling, dispersion) as features x categories tables.

:class:`GlobalSiteTables` is a base of :class:`~pyro_scmodels.models.posterior_queries.PosteriorQueries`:
``global_site_table`` reads a site's posterior median from the guide (or the value a subclass's model fixes) and
labels its rows with the categories of the covariate that indexes it. A multimodal model names its sites by modality
(:class:`ModalitySiteNames`). It uses the model's ``module``, ``keys``, ``encoding`` and
``feature_names``, and a multimodal model's ``unfitted_categories``.
"""

from __future__ import annotations

import pandas as pd

from .regularizedvi_module import SITE_COVARIATE_ROLES


class GlobalSiteTables:
    """Tables of the per-feature global sites and the category names along their first axis."""

    def global_site_table(self, site: str, modality: str | None = None) -> pd.DataFrame:
        """A per-feature global site's posterior median as a features x categories table.

        Parameters
        ----------
        site
            ``"ambient"``, ``"feature_scaling"``, ``"inverse_sqrt_theta"`` or ``"dispersion"``
            (theta = u^-2, derived from ``inverse_sqrt_theta``).
        modality
            Multimodal models: the modality.
        """
        model, guide = ((self.module.model, self.module.guide) if modality is None
                        else (self.module.model.block(modality), self.module.guide.block(modality)))
        medians = guide.global_medians()
        source = "inverse_sqrt_theta" if site == "dispersion" else site
        if source not in medians:
            where = "" if modality is None else f" of modality {modality!r}"
            raise ValueError(f"The model has no {site!r} site{where}; sites: {sorted(medians)}.")
        values = model.global_values(medians)[source]  # a subclass's fixed value, not the guide's unused one
        values = values.pow(-2) if site == "dispersion" else values
        return pd.DataFrame(values.detach().cpu().numpy().T, index=self.feature_names(modality),
                            columns=self.site_levels(site, values.shape[0]))

    def shared_background(self, modality: str | None = None) -> pd.Series | None:
        """The part of the ambient background s that every cell carries.

        Per feature, the sum over ambient keys of the smallest s among the key's categories (with no ambient key, s
        of the one category "all"). Every cell has one category of each key, so with the default background, which
        scales with the library size, adding a vector ``c`` (up to this one) to rho and taking it from every
        category of a key leaves the mean ``l (rho + s) y`` unchanged: only the categories' differences are fixed by
        the data, and this part is where the fit happened to leave it. Two set-ups pin it partly: with
        ``ambient_per_droplet=True`` the mean is ``(l rho + s) y``, so moving ``c`` changes it by ``(l - 1) c y``
        (here ``c`` is read at l = 1, a convention); and where an ambient key also conditions the decoder, the decoder
        can take per-category offsets itself, so not even rho + c is fixed exactly.

        A multimodal model's categories with no cell measured in ``modality`` are left out of the minimum: their
        background never left its starting value (the likelihood of those cells is masked) and would set the
        minimum to it.

        Parameters
        ----------
        modality
            Multimodal models: the modality.

        Returns
        -------
        pandas.Series or None
            Indexed by feature, in rho's units; None when the model (or the modality) has no ambient background.
        """
        guide = self.module.guide if modality is None else self.module.guide.block(modality)
        if "ambient" not in guide.global_medians():  # this model or modality has no background
            return None
        table = self.global_site_table("ambient", modality)
        keys = list(self.keys.ambient or [])
        if not keys:
            return table.iloc[:, 0].rename("shared_background")
        # a multimodal model's record of its training cells (kept in its saves), not the cells it is bound to now
        unfitted = getattr(self, "unfitted_categories", {}).get(modality, {})
        unmeasured = {level for level, parameters in unfitted.items() if "ambient" in parameters}
        shared = pd.Series(0.0, index=table.index)
        for key in keys:
            start, stop, _ = self.encoding.stacked_span(keys, key, self.encoding.categories[key][0])
            measured = [start + j for j, category in enumerate(self.encoding.categories[key])
                        if (key, str(category)) not in unmeasured]
            if measured:  # every cell measured in the modality has a category of each key
                shared = shared + table.iloc[:, measured].min(axis=1)
        return shared.rename("shared_background")

    def site_levels(self, site: str, n_levels: int) -> list[str]:
        """Category names along the first axis of a per-feature global site (ambient, scaling, dispersion)."""
        base = self._site_base_name(site)
        role = SITE_COVARIATE_ROLES.get(base)
        if role is None:
            return [f"{site}_{j}" for j in range(n_levels)]
        keys = getattr(self.keys, role)
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        return self.encoding.level_names(keys)

    def site_modality(self, site: str) -> str | None:
        """The modality a site belongs to: None for a single-modality model."""
        return None

    def _site_base_name(self, site: str) -> str:
        """The site's name without a modality suffix."""
        return site


class ModalitySiteNames:
    """How a multimodal model's sites name their modality: by a suffix (``obs_atac``; a shared site has none).

    Put before the model's base classes, it overrides :class:`GlobalSiteTables`' ``site_modality`` and
    ``_site_base_name`` and the posterior export's ``_feature_table``; it uses the model's ``modalities``.
    """

    def site_modality(self, site: str) -> str | None:
        """The modality a site belongs to (its suffix, e.g. ``obs_atac`` -> ``"atac"``); None for a shared site."""
        # the longest suffix: with modalities "rna" and "new_rna", "obs_new_rna" is new_rna's
        return max((m for m in self.modalities if site.endswith(f"_{m}")), key=len, default=None)

    def _feature_table(self, site: str, mdata):
        modality = self.site_modality(site)
        return mdata if modality is None else mdata.mod[modality]

    def _site_base_name(self, site: str) -> str:
        modality = self.site_modality(site)
        return site if modality is None else site[: -len(modality) - 1]
