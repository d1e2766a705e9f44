"""What a model says about itself: ``view_anndata_setup()`` and its printed summary."""

from __future__ import annotations

import dataclasses
import math

from ..data.summary import describe_setup
from ..priors import edited_fields
from .scvi_arguments import refuses_scvi_arguments

# settings shown in the summary, in this order, when the model has them
_SHOWN_SETTINGS = ("n_latent", "n_hidden", "n_layers", "latent_mode", "dropout_rate", "init", "latent_independence",
                   "ambient_per_droplet", "ambient_shape_prior", "decoder_gene_scale")
_ROLE_NAMES = (("ambient", "ambient"), ("nn_conditioning", "decoder-conditioning"), ("feature_scaling", "feature scaling"),
               ("dispersion", "dispersion"), ("library_size", "library size"), ("encoder", "encoder"),
               ("continuous", "continuous"))


class ModelDescription:
    """``view_anndata_setup`` and ``__repr__`` for the user classes.

    Needs of the model class: ``adata``, ``keys``, ``init_params``, ``is_trained``, ``device`` and
    ``history``.
    """

    @refuses_scvi_arguments("query")
    def view_anndata_setup(self, adata=None) -> None:
        """Print the setup the model reads: cells, features, counts layer and every covariate's categories.

        Parameters
        ----------
        adata
            An AnnData/MuData set up for this model class (its recorded setup is printed); default the model's
            own data, with the keys and category order the model uses (a later ``setup_anndata`` on that object,
            a load onto columns of another order or a query's new categories do not change them).
        """
        if adata is not None:
            print(describe_setup(adata))
            return
        own = dataclasses.replace(self._setup, keys=self.keys, categories=self.encoding.categories)
        print(describe_setup(self.adata, own))

    def __repr__(self) -> str:
        name = type(self).__name__
        settings = ", ".join(f"{k}={self.init_params[k]!r}" for k in _SHOWN_SETTINGS if k in self.init_params)
        data = self.adata
        size = f"{data.n_obs} cells x " + (
            " + ".join(f"{data.mod[m].n_vars} {m}" for m in self.modalities) if hasattr(data, "mod") else f"{data.n_vars} genes")
        roles = []
        for field, label in _ROLE_NAMES:
            keys = getattr(self.keys, field)
            keys = [keys] if isinstance(keys, str) else list(keys or [])
            built = self._modalities_with_role(field)
            if keys and built != []:  # keys of a role no modality was built with are not shown
                roles.append(f"{label}: {', '.join(keys)}" + (f" ({', '.join(built)})" if built else ""))
        lines = [f"{name}({settings})", f"  data: {size}",
                 f"  covariates: {'; '.join(roles) if roles else 'none'}", f"  {self._priors_line()}",
                 f"  {self._training_status()}"]
        return "\n".join(lines)

    def _modalities_with_role(self, field: str) -> list[str] | None:
        """The modalities built with the sites of an ambient or feature-scaling role; None: not given per modality."""
        attribute = {"ambient": "use_ambient", "feature_scaling": "use_feature_scaling"}.get(field)
        if attribute is None or not hasattr(self, "modalities"):
            return None
        return [m for m in self.modalities if getattr(self.module.guide.block(m).dims, attribute)]

    def __str__(self) -> str:
        return self.__repr__()

    def _priors_line(self) -> str:
        """Which priors differ from the defaults (their values: ``model.priors``)."""
        priors = self.priors
        edited = ({m: edited_fields(p) for m, p in priors.items()} if isinstance(priors, dict) else
                  {None: edited_fields(priors)})
        parts = [(f"{m}: " if m is not None else "") + (", ".join(fields) if fields else "defaults")
                 for m, fields in edited.items()]
        return "priors: " + ("; ".join(parts) if any(edited.values()) else "the defaults") + (
            " (edited; values in model.priors)" if any(edited.values()) else "")

    def _training_status(self) -> str:
        history = self.history
        if not self.is_trained:
            return "training: not trained"
        status = f"training: trained for {len(history)} epochs (device {self.device})"
        if len(history):
            last = history.iloc[-1]
            validation = history["validation_loss"].dropna()
            status += f"; last train loss {last['train_loss']:.4g}"
            if len(validation) and not math.isnan(validation.iloc[-1]):
                status += f", last validation loss {validation.iloc[-1]:.4g}"
        return status
