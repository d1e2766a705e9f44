"""Save and load of :class:`~pyro_scmodels.RegularizedMultimodalVI`: its payload, its record of module classes and
priors as earlier versions wrote them."""

from __future__ import annotations

from .train_options import load_device
from ..data import check_var_names, require_mudata, setup_arguments
from ..priors import RegularizedPriors
from .regularizedvi_guide import RegularizedVIGuide
from .regularizedvi_module import RegularizedVIModel


class MultimodalPersistence:
    """The multimodal parts of save and load (mixed into :class:`~pyro_scmodels.RegularizedMultimodalVI`, before
    :class:`~pyro_scmodels.models._base.PyroModelBase`)."""

    @classmethod
    def _module_classes(cls) -> str:
        # the blocks too: a subclass's block_model_class edits sites the outer classes do not show
        return f"{super()._module_classes()}; blocks {cls.block_model_class.__name__} / {cls.block_guide_class.__name__}"

    def _legacy_module_classes(self) -> tuple[str, bool]:
        # saves and checkpoints before 2026-12-06 recorded the outer classes only (every record since has the blocks):
        # they check a model of the plain blocks, not a subclass's own
        plain = (self.block_model_class, self.block_guide_class) == (RegularizedVIModel, RegularizedVIGuide)
        return super()._module_classes(), plain

    def _legacy_priors(self) -> dict[str, RegularizedPriors]:
        # every block's priors as its buffers hold them, the sites it lacks included (checkpoints before 2026-12-06)
        return {m: self.module.model.block(m).prior_settings() for m in self.modalities}

    def _legacy_settings(self, settings: dict) -> dict | None:
        # saves and checkpoints before 2026-12-06 recorded n_hidden and n_latent as given: such a record matches a
        # model given them the same way (a save's init_params give them back so when it is loaded)
        given = {**settings, **self._given_sizes}
        # compared as the fingerprint's text: a dict in another order, or np.int64(8) for 8, reads differently there
        return None if repr(given) == repr(settings) else given

    def _save_payload(self) -> dict:
        return {
            "class": type(self).__name__, "init_params": self.init_params, "modalities": self.modalities,
            "layers": self.layers, "keys": self.keys.to_dict(), "categories": self.encoding.categories,
            "var_names": {m: list(v) for m, v in self.var_names.items()},
            "unfitted categories": self.unfitted_categories,
        }

    def _restore(self, payload: dict) -> None:
        super()._restore(payload)
        # the categories without counts in the training data: loaded on other cells, the model cannot tell them
        # (a save before 2026-12-07 lacks them: those of the cells it is loaded on)
        self.unfitted_categories = payload.get("unfitted categories", self.unfitted_categories)

    @classmethod
    def load(cls, dir_path: str, mdata=None, device: str = "auto", prefix: str | None = None,
             accelerator: str | None = None):
        """Load a model saved with :meth:`save`, bound to ``mdata`` (same features per modality).

        Parameters
        ----------
        dir_path
            The folder written by :meth:`save`.
        mdata
            MuData with the model's modalities and features; None: the MuData saved with
            ``save(..., save_anndata=True)``.
        device
            ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; with
            ``accelerator``, scvi-tools' meaning: ``"auto"`` or a GPU index.
        prefix
            The prefix the model was saved with (files ``f"{prefix}model.pt"``, ``f"{prefix}mdata.h5mu"``); None:
            no prefix.
        accelerator
            scvi-tools' ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"`` (as in its ``load``); None: ``device`` decides.

        Returns
        -------
        RegularizedMultimodalVI
        """
        return cls._load(dir_path, mdata, load_device(device, accelerator), "mudata", prefix)

    @classmethod
    def _bind_saved(cls, payload: dict, mdata) -> None:
        require_mudata(mdata, f"{cls.__name__}.load")
        for m, names in payload["var_names"].items():
            if m not in mdata.mod:
                raise ValueError(f"mdata has no modality {m!r}, which the saved model needs.")
            check_var_names(names, mdata.mod[m], f"mdata.mod[{m!r}]")
        cls.setup_mudata(mdata, modalities=payload["modalities"], layer=payload["layers"], **setup_arguments(payload["keys"]))
