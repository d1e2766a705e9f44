"""NDreamer: effect-modifier space, counterfactual matching, batch denoising and treatment effects.

``NDreamer(adata, condition_key, control_name, batch_key)`` preprocesses (SPEC 3.1), trains the
discrete-code network (3.2-3.4) on the package's training loop with balanced draws from every
batch x condition group, and matches cells across groups with FAISS (3.5). Results live in one
AnnData aligned with the input.

Every instance is built by one private method, :meth:`NDreamer._setup`, whichever the entry
point: the constructor (from an AnnData), :meth:`NDreamer.load` (from a folder) or
:meth:`NDreamer.from_model` (from a trained Pyro model's latent space). The representation is
either ``"network"`` (trainable) or ``"latent"`` (a fixed embedding, e.g. a model's z).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import _validation as V
from .._io import writable_folder
from .._labels import names_as_text
from .._stacklevel import user_stacklevel
from ..checkpoints import CHECKPOINT_FILE
from ..data import check_unique_names, refuse_mudata
from ..distributed import launched_world_size
from ..infer import resolve_device
from ..training import LoopPlan
from . import _constants as K
from ._persistence import EMBEDDING_KEY, NETWORK
from .effect_queries import EffectQueries, labels_of
from .design import design_from_obs, design_keys
from .counterfactual_design import CounterfactualDesign
from .effects import FACTUAL_CHOICES
from .matched_effects import MatchedEffects
from .save_load import NDreamerSaveLoad
from .loss_layout import minibatch_layout
from .losses import LossWeights
from .network import NDreamerNetwork, checked_sizes
from .presets import own_space_factual
from .gene_selection import gene_selection_cells, variable_genes
from .preprocess import log_normalise, pseudo_labels
from .representation import ModelRepresentation
from .trainer import NDreamerTrainer, expression_summary, training_fingerprint
from ..seeding import rng_devices, seeded

logger = logging.getLogger(__name__)
ONE_PROCESS_ONLY = ("NDreamer trains in one process (its losses compare cells across the whole minibatch); run it "
                    "without torchrun (docs/distributed.md).")



class NDreamer(ModelRepresentation, EffectQueries, NDreamerSaveLoad):
    """Learn an effect-modifier space and estimate batch effects and per-cell treatment effects.

    Parameters
    ----------
    adata
        Cells x genes, raw counts or log-normalised values (detected and logged). In memory, or
        backed (``anndata.read_h5ad(path, backed="r")``): then, when every gene is used or the genes
        are chosen on a sample (more than 50,000 cells), the raw counts of the chosen genes are held
        as :class:`~pyro_scmodels.ndreamer.count_rows.LogNormalisedCounts` (4 bytes per stored
        entry, half a float32 CSR), :attr:`expression` is that object and ``results.X`` is None
        (read rows with ``nd.expression[cells]``); otherwise, and for log-normalised input, the
        float32 CSR of the chosen genes, as in memory (docs/ndreamer.md, "Data on disk").
    condition_key, control_name
        Column of ``adata.obs`` with the condition, and the control condition's name.
    batch_key
        A column, a list of columns (each its own batch effect), or None.
    num_hvg
        Genes used (all genes when there are fewer): a tenth are the genes that differ most
        between conditions within batches, the rest the most variable genes per batch with the
        conditions pooled (:func:`~pyro_scmodels.ndreamer.gene_selection.variable_genes`). Per
        batch x condition group, HVGs dropped IFI6, IFIT1 and IFIT3 on Kang; this keeps them.
        With more than 50,000 cells the genes are chosen on a seeded sample of 50,000 (at least
        500 a group, so more with over 100 groups) spread over the batch x condition groups
        (:func:`~pyro_scmodels.ndreamer.gene_selection.gene_selection_cells`), and only the chosen genes
        of every cell are then read.
    layer
        Layer to read instead of ``.X``.
    n_codebooks, codebook_size, codebook_dim, embedding_dim, z_dim, encoder_hidden, decoder_hidden
        Network sizes (SPEC 3.2).
    loss_weights
        A :class:`~pyro_scmodels.ndreamer.LossWeights`.
    batch_size, lr, device, seed
        Training settings (AdamW).
    min_cells_per_group
        Fewest cells a batch x condition group may hold; smaller groups are refused with an error
        that names them (every cell is matched into every group).
    keep_genes
        Genes always kept in addition to the ``num_hvg`` chosen ones (e.g. genes whose effects you
        want even when they respond weakly).
    factual
        How the matched ITE (:meth:`estimate_ite`) takes a cell's value in its own batch and condition:
        ``"observed"``, the cell's own expression; ``"matched"``, the kernel-weighted mean of its k nearest
        cells there (itself among them), as for every other batch and condition, which removes the cell's
        own counting noise but keeps only as much of its state as the embedding does. ``"auto"`` (default):
        ``"matched"`` with the default network sizes and loss weights, ``"observed"`` with any other
        (:func:`~pyro_scmodels.ndreamer.presets.own_space_factual` has the measurements: the compact network
        keeps too little of the state inside a cell type for ``"matched"``). The choice made is kept in
        ``settings["factual"]``. ``denoised`` and ``batch_effect`` use the observed value either way.
    contorl_name
        Deprecated spelling of ``control_name`` accepted from the reference implementation.
    """

    def __init__(self, adata, condition_key: str, control_name: str | None = None, batch_key=None,
                 num_hvg: int = K.NUM_HVG, layer: str | None = None, n_codebooks: int = K.N_CODEBOOKS,
                 codebook_size: int = K.CODEBOOK_SIZE, codebook_dim: int = K.CODEBOOK_DIM,
                 embedding_dim: int = K.EMBEDDING_DIM, z_dim: int = K.Z_DIM, encoder_hidden=K.ENCODER_HIDDEN,
                 decoder_hidden=K.DECODER_HIDDEN, loss_weights: LossWeights | None = None,
                 batch_size: int = K.BATCH_SIZE, lr: float = K.LEARNING_RATE, device: str = "auto", seed: int = 0,
                 keep_genes=None, min_cells_per_group: int = K.MIN_CELLS_PER_GROUP, factual: str = "auto",
                 contorl_name: str | None = None):
        if contorl_name is not None:
            warnings.warn("`contorl_name` is deprecated; use `control_name`.", DeprecationWarning,
                          stacklevel=user_stacklevel())
            control_name = control_name if control_name is not None else contorl_name
        if control_name is None:
            raise ValueError("control_name is required: the name of the control condition.")
        refuse_mudata(adata, "NDreamer")
        if adata.n_obs == 0:
            raise ValueError("adata has zero cells.")
        check_unique_names(adata)  # results are indexed by cell and gene names
        # every setting is checked here, before the preprocessing (gene choice, Leiden) that large data wait for
        sizes = checked_sizes(n_codebooks=n_codebooks, codebook_size=codebook_size, codebook_dim=codebook_dim,
                              embedding_dim=embedding_dim, z_dim=z_dim, encoder_hidden=encoder_hidden,
                              decoder_hidden=decoder_hidden)
        loss_weights = LossWeights.from_value(loss_weights)
        device = resolve_device(device)  # "cuda" without a GPU was refused only after the preprocessing
        condition_key, batch_keys = design_keys(condition_key, batch_key)
        settings = dict(condition_key=condition_key, control_name=str(control_name), batch_key=batch_keys,
                        num_hvg=V.integer("num_hvg", num_hvg, minimum=2,
                                          description="an integer >= 2 (genes for the PCA of the cell states)"),
                        layer=layer, **sizes,
                        batch_size=V.positive_int("batch_size", batch_size), lr=V.positive_float("lr", lr),
                        seed=V.seed("seed", seed),
                        representation=NETWORK,
                        min_cells_per_group=V.positive_int("min_cells_per_group", min_cells_per_group),
                        factual=V.choice("factual", factual, ("auto", *FACTUAL_CHOICES)))
        if settings["factual"] == "auto":
            settings["factual"] = own_space_factual(sizes, loss_weights)
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}).")
        design = design_from_obs(adata.obs, settings)
        # --- SPEC 3.1: log-normalised expression of variable genes, pseudo cell states per group
        if keep_genes is not None:
            if isinstance(keep_genes, str) or np.asarray(keep_genes).dtype == bool:
                # a string would be read as its characters, a mask as the names True and False
                given = f"the string {keep_genes!r}" if isinstance(keep_genes, str) else "a boolean mask"
                raise V.ArgumentTypeError(f"keep_genes takes a list of gene names, got {given}; pass e.g. "
                                          "['IFI6', 'IFIT1'] (for a mask: list(adata.var_names[mask])).")
            missing = sorted(set(keep_genes) - set(adata.var_names))
            if missing:
                raise KeyError(f"keep_genes {missing[:5]} not found in adata.var_names.")
        if adata.n_vars <= settings["num_hvg"]:  # every gene is used: no selection
            expression, hvg = log_normalise(adata, layer, compact=adata.isbacked), np.ones(adata.n_vars, dtype=bool)
        else:
            # the genes are chosen on at most HVG_MAX_CELLS cells; then only the chosen genes of every
            # cell are read, so the all-genes matrix of a large (backed) data set is never held
            sample = gene_selection_cells(design.groups, seed=seed)
            rows = slice(None) if sample is None else sample
            chosen_from = log_normalise(adata, layer, cells=sample)
            hvg = variable_genes(chosen_from, adata.var_names, design.batch[rows], design.condition[rows],
                                 design.control_name, settings["num_hvg"])
            if keep_genes is not None:
                hvg = hvg | np.asarray(adata.var_names.isin(list(keep_genes)))
            expression = (chosen_from[:, hvg].tocsr() if sample is None
                          else log_normalise(adata, layer, genes=hvg, compact=adata.isbacked))
            del chosen_from
        labels = pseudo_labels(expression, design.groups, seed)
        self._setup(settings, adata.obs.copy(), expression, names_as_text(adata.var_names[hvg]), device,
                    labels=labels, loss_weights=loss_weights, design=design)

    def _setup(self, settings: dict, obs: pd.DataFrame, expression, genes: pd.Index, device,
               labels: tuple[np.ndarray, np.ndarray] | None = None, loss_weights: LossWeights | None = None,
               latent: np.ndarray | None = None, model=None, design: CounterfactualDesign | None = None) -> None:
        """The one constructor path: every attribute of every entry point is set here.

        A ``"network"`` representation gets a freshly initialised (seeded) network; a ``"latent"``
        one gets ``latent`` as its fixed embedding and, optionally, the ``model`` it came from.
        """
        self.settings, self.device = settings, resolve_device(device)
        # a copy: a caller's LossWeights (e.g. from network_preset, reused for several NDreamers) is not shared
        self.loss_weights = LossWeights.from_value(loss_weights)
        # the constructor has already checked the design from the same obs; the other paths build it here
        self.design = design_from_obs(obs, settings) if design is None else design
        self.genes, self.expression, self.model = genes, expression, model
        self.label_low, self.label_high = labels if labels is not None else (None, None)
        self.condition_codes = pd.Categorical(self.design.condition, categories=self.design.conditions).codes.astype(np.int64)
        batches = labels_of(obs, settings["batch_key"], "batch_key")
        self.batch_codes = np.stack([pd.Categorical(batches[:, j]).codes for j in range(batches.shape[1])], 1).astype(
            np.int64) if batches.shape[1] else np.zeros((len(obs), 0), dtype=np.int64)
        self.network, self.trainer, self._expression_summary = None, None, None
        self._saved_network = False  # a network read from a saved folder (trained, though no trainer came with it)
        if settings["representation"] == NETWORK:
            batch_sizes = [len(set(batches[:, j])) for j in range(batches.shape[1])]
            with seeded(settings["seed"], self.device):
                self.network = NDreamerNetwork(
                    len(genes), len(self.design.conditions), batch_sizes, tuple(settings["encoder_hidden"]),
                    settings["n_codebooks"], settings["codebook_size"], settings["codebook_dim"],
                    settings["embedding_dim"], settings["z_dim"], tuple(settings["decoder_hidden"]),
                ).to(self.device)
        # X is the matrix the effects read, not a copy of it: at 10^6 cells a copy is gigabytes. From a backed
        # input the expression is held as counts (LogNormalisedCounts, half the memory), which is no AnnData X
        self.results = anndata.AnnData(X=expression if sp.issparse(expression) else None, obs=obs,
                                       var=pd.DataFrame(index=genes))
        self.results.uns["ndreamer"] = {"condition_key": settings["condition_key"], "control_name": settings["control_name"],
                                        "conditions": self.design.conditions, "batch_key": settings["batch_key"],
                                        "representation": settings.get("model", settings["representation"])}
        # results saved before the setting existed used the cell's own value
        self.effects = MatchedEffects(expression, self.design, seed=settings["seed"],
                                      factual=settings.get("factual", "observed"))
        if latent is not None:
            self._set_embedding(latent)

    @property
    def history(self) -> pd.DataFrame:
        """Per pass: mean training loss and mean of every loss part (empty before training)."""
        return pd.DataFrame() if self.trainer is None else self.trainer.history.astype(float)

    # --- training -----------------------------------------------------------------------------
    def _minibatch(self, cells: np.ndarray) -> dict:
        # the labels' layout (groups, blocks, label columns) is built here on the host and sent with the values:
        # on a GPU, building it there would read sizes back to the host several times a step
        host = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        condition, label_low, label_high = (host(codes[cells])
                                            for codes in (self.condition_codes, self.label_low, self.label_high))
        batches = host(self.batch_codes[cells]) if self.batch_codes.shape[1] else None
        layout = minibatch_layout(condition, batches, label_low, label_high, self.network.n_codebooks)
        return {
            "x": torch.as_tensor(self.expression[cells].toarray(), device=self.device),
            "condition": condition.to(self.device),
            "batches": batches.to(self.device) if batches is not None else None,
            "label_low": label_low.to(self.device),
            "label_high": label_high.to(self.device),
            "n_conditions": len(self.design.conditions),
            "layout": layout.to(self.device),
        }

    def _fingerprint(self) -> dict:
        """What identifies this NDreamer's training data and settings (checked before resuming)."""
        if self._expression_summary is None:  # the expression never changes: summed once
            self._expression_summary = expression_summary(self.expression)
        labels = [self.condition_codes, self.batch_codes, self.label_low, self.label_high]
        return training_fingerprint(self.results.obs_names, self.genes, self.settings, self.loss_weights,
                                    self.design.conditions, labels, self._expression_summary)

    def train(self, n_epochs: float | None = None, progress_bar: bool = True, checkpoint_dir: str | None = None,
              checkpoint_every: int = K.CHECKPOINT_EVERY, gradient_clip: float | None = K.GRADIENT_CLIP_NORM) -> pd.DataFrame:
        """Train the network on balanced draws from every batch x condition group.

        Parameters
        ----------
        n_epochs
            Passes in this call (default 15): a pass is ``ceil(n_cells / batch_size)`` steps (at least
            one; with fewer cells than ``batch_size`` it draws more cells than the data hold), and each
            step draws ``batch_size / n_groups`` cells from every group (with replacement for small
            groups). A further call continues training (optimiser state kept) for ``n_epochs`` more
            passes: ``train(2)`` twice is ``train(4)``. A fraction of a pass ends inside one, and the
            pass it started counts as one (a history row, and a pass in the printed summary); the next
            call starts a new pass, so ``train(0.5)`` twice is not ``train(1)``.
        progress_bar
            Show a tqdm bar.
        checkpoint_dir
            Write the training state there every ``checkpoint_every`` passes and at the end. If a
            checkpoint is there when a new NDreamer first trains, training resumes from it and its
            passes count towards ``n_epochs``; it must come from the same cells, genes and settings.
            The resumed run equals an uninterrupted one when the earlier run ended on a whole pass.
        checkpoint_every, gradient_clip
            Passes between checkpoints; maximum gradient norm (``None``: no clipping).

        Returns
        -------
        pandas.DataFrame
            :attr:`history`. The embedding and every effect computed before are dropped.
        """
        if self.network is None:
            raise ValueError("This NDreamer uses a fixed latent representation (from_model): there is no network to train.")
        if launched_world_size() > 1:  # each process would train the whole network and write the same checkpoint
            raise ValueError(ONE_PROCESS_ONLY)
        passes = K.PASSES if n_epochs is None else V.positive_float("n_epochs", n_epochs)
        checkpoint_dir = V.optional(V.file_path, "checkpoint_dir", checkpoint_dir)
        self._sync_loss_weights()
        if self.trainer is None:
            self._make_trainer()
        else:  # what the checkpoints of this call record: loss weights edited since the first call are part of it
            self.trainer.fingerprint = self._fingerprint()
        t = self.trainer
        epoch, step = t.call_start()  # after Ctrl-C: where the interrupted call started, which this one finishes
        plan = LoopPlan(max_epochs=epoch + int(np.ceil(passes)), max_steps=step + t.steps_for(passes),
                        gradient_clip=gradient_clip, progress_bar=progress_bar,
                        checkpoint_path=None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_FILE),
                        checkpoint_every=checkpoint_every)  # LoopPlan checks its settings
        if checkpoint_dir is not None:  # the last check before training
            writable_folder("checkpoint_dir", checkpoint_dir)
        try:
            with torch.random.fork_rng(devices=rng_devices(self.device)):
                t.fit(plan, seed=self.settings["seed"])
        finally:
            self._invalidate()  # the representation changed (even if only partly): nothing computed before holds
        return self.history

    def _sync_loss_weights(self) -> None:
        """Check :attr:`loss_weights` as it is now and hand it to the trainer: a LossWeights assigned after the first
        ``train()`` was recorded by saves and checkpoints but not trained with, and an entry edited in place was not
        checked (a negative weight rewards the part it weighs)."""
        weights = self.loss_weights
        self.loss_weights = LossWeights.from_value(dataclasses.asdict(weights) if isinstance(weights, LossWeights)
                                                   else weights)
        if self.trainer is not None:
            self.trainer.loss_weights = self.loss_weights

    def _make_trainer(self) -> NDreamerTrainer:
        self.trainer = NDreamerTrainer(self.network, self._minibatch, self.design.groups, self.settings["batch_size"],
                                       self.settings["lr"], self.loss_weights, self._fingerprint())
        return self.trainer

    def _invalidate(self) -> None:
        self.effects.invalidate()
        for key in (EMBEDDING_KEY, EMBEDDING_KEY + "_PCA"):
            self.results.obsm.pop(key, None)
        # every effect layer, the ITE's interval bounds and the old space's clusters too (they stayed, and were
        # saved, beside a new network)
        self._drop_ite_results()
        for layer in [name for name in self.results.layers if name in ("denoised", "batch_effect")]:
            del self.results.layers[layer]

    # --- embedding and effects ------------------------------------------------------------------
    def _set_embedding(self, embedding: np.ndarray, space: np.ndarray | None = None) -> None:
        self.effects.set_embedding(embedding, space)
        self.results.obsm[EMBEDDING_KEY] = self.effects.embedding
        self.results.obsm[EMBEDDING_KEY + "_PCA"] = self.effects.space

    @torch.no_grad()
    def get_modifier_space(self) -> np.ndarray:
        """The effect-modifier embedding (deterministic), stored with its PCA in ``results.obsm``.

        Returns
        -------
        numpy.ndarray
            Cells x ``z_dim`` (network), or the fixed latent (``from_model``).
        """
        if self.network is None:
            return self.effects.embedding
        if (self.trainer is None or self.trainer.step == 0) and not self._saved_network:
            warnings.warn("This NDreamer has not been trained: its embedding, and every effect matched in it, come "
                          "from a randomly initialised network. Call train() first.", UserWarning, stacklevel=user_stacklevel())
        elif self.trainer is not None and self.trainer.interruption:
            warnings.warn(f"Training was interrupted: the network was {self.trainer.interruption}. Call train() again "
                          "with the same n_epochs to finish that call (it starts again from the last whole pass).",
                          UserWarning, stacklevel=user_stacklevel())
        # one block of cells densified at a time: never a cells x genes dense array
        step = self.settings["batch_size"]
        parts = [self.network.embed(torch.as_tensor(self.expression[start : start + step].toarray(), device=self.device)).cpu()
                 for start in range(0, self.expression.shape[0], step)]
        embedding = torch.cat(parts).numpy()
        self._set_embedding(embedding)
        return embedding

    # --- persistence ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        s, design = self.settings, self.design
        source = (f"the latent of a {s.get('model', 'model')}"
                  + (f", the expression of its {s['modality']!r}" if s.get("modality") else "")
                  if s["representation"] != NETWORK
                  else "its own network" + ("" if self.trainer is None else f", trained {self.trainer.epoch} passes"))
        batches = sorted({str(b) for b in design.batch}) if s["batch_key"] else []
        computed = sorted(name for name in self.results.layers if name.startswith(("ite", "denoised", "batch_effect")))
        return "\n".join([
            f"NDreamer({self.results.n_obs} cells x {len(self.genes)} genes; representation: {source})",
            f"  condition {s['condition_key']!r}: control {design.control_name!r}, treatments {design.treatments}",
            f"  batches ({', '.join(s['batch_key']) or 'none'}): {batches[:10] if batches else 'one'}",
            f"  layers computed: {', '.join(computed) if computed else 'none yet'}",
        ])
