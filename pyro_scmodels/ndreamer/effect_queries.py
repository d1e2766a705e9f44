"""The effects NDreamer answers from its matches: batch decomposition, per-cell ITE, CATE, effects on disk.

:class:`EffectQueries` is a mixin of :class:`~pyro_scmodels.ndreamer.NDreamer`; it reads the instance's
``effects`` (:class:`~pyro_scmodels.ndreamer.MatchedEffects`), ``results``, ``genes`` and ``design``, and
its ``get_modifier_space()``. Whole-data layers go in ``results``; with ``indices=`` / ``gene_list=``
only the cells and genes asked for are computed, and :meth:`EffectQueries.write_effects` writes every
cell's layers to disk block by block.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd

from .. import _validation as V
from . import _constants as K
from ._persistence import write_effects_h5ad
from .cate import CONTROL, OTHER, TREATED, CateSums, groups_with_both_conditions
from .effect_intervals import bound_names, interval_level, single_cell_groups
from .effects import FACTUAL_CHOICES
from .ite_shrinkage import CLUSTER_KEY, NO_SHRINK, SHRINK_CHOICES
from .._selection import cell_positions, gene_positions


#: how messages name an NDreamer's cell table (a copy of the input's obs, made when it was built)
RESULTS_OBS = "nd.results.obs"
#: ``results.uns`` key of the matching (nearest_neighbor, bandwidth) that the ``ite_*`` layers hold
ITE_SETTINGS = "ite_matching"
#: how the stored ITE layers average the arms (recorded with them: layers saved before it averaged each arm over its own
#: batches)
ITE_ARMS = "batches holding both"


def labels_of(obs: pd.DataFrame, keys: list[str], what: str, table: str = "adata.obs") -> np.ndarray:
    """``obs[keys]`` as strings, or an error naming a missing column or one with missing values.

    ``table`` names ``obs`` in the messages; ``"nd.results.obs"`` (an NDreamer's cells, which stay) says to fill
    the missing labels rather than drop their cells.
    """
    for key in keys:
        if key not in obs:
            raise KeyError(f"{what} {key!r} not found in {table} (columns: {list(obs.columns)[:20]}).")
        missing = int(obs[key].isna().sum())
        if missing:
            fix = ("give every cell a group (e.g. a label such as 'unassigned'): an NDreamer keeps every cell"
                   if table == RESULTS_OBS else "fill or drop those cells first")
            raise ValueError(f"{table}[{key!r}] has {missing} missing values; {fix}.")
    return obs[keys].astype(str).to_numpy()


def ite_record(nearest_neighbor: int, bandwidth: float, shrink: str | None, level: float | None,
               factual: str) -> dict:
    """How ITE layers were made, as ``results.uns[ITE_SETTINGS]`` and a :meth:`~EffectQueries.write_effects` file's
    ``uns`` record it: the matching, the arms' rule, the shrinkage (``"none"``: an h5ad stores no None), the cell's
    own term (``factual``) and, with bounds, their level."""
    record = {"nearest_neighbor": V.positive_int("nearest_neighbor", nearest_neighbor),
              "bandwidth": V.positive_float("bandwidth", bandwidth), "arms": ITE_ARMS,
              "shrink": shrink or NO_SHRINK, "factual": factual}
    return record if level is None else {**record, "interval": float(level)}


def _check_interval_neighbours(nearest_neighbor, design) -> None:
    """Before any matching: an interval is estimated from the spread of at least two matched cells per group."""
    if V.positive_int("nearest_neighbor", nearest_neighbor) < 2:
        raise ValueError(f"An interval is estimated from the spread of the matched cells and needs at least two: got "
                         f"nearest_neighbor={nearest_neighbor}; pass nearest_neighbor >= 2 (default {K.NEAREST_NEIGHBOR}).")
    single = single_cell_groups(design)
    if single:
        raise ValueError(f"An interval is estimated from the spread of the matched cells, but batch x condition group(s) "
                         f"{single[:5]} hold a single cell: remove those cells or merge their batches.")



def refuse_slash_in_groupby(groupby: str, name: str = "groupby") -> None:
    """Refuse a CATE column holding ``/``: its table is kept as ``results.uns["cate_<condition>_<groupby>"]``, which an
    h5ad saves as a nested key (load returned it under another one)."""
    if "/" in str(groupby):
        raise ValueError(f"{name} {groupby!r} holds '/': the CATE table is kept as results.uns['cate_<condition>_"
                         f"{groupby}'], which an h5ad would save under a nested key. Copy the column to a name "
                         "without '/' (e.g. obs['cell_type'] = obs['cell/type']).")

class EffectQueries:
    """Effects of an NDreamer's matches: the methods of :class:`~pyro_scmodels.ndreamer.NDreamer` that answer them."""

    @property
    def factual(self) -> str:
        """How the ITE takes a cell's own batch and condition: ``"observed"`` (its own expression) or ``"matched"``
        (its matched cells there), as chosen at construction (``factual=``; ``"auto"`` resolved).

        Setting it keeps the matches and drops what was made with the other: the ITE layers, their bounds and
        clusters in :attr:`results`, the CATE tables, and a model ITE's bounds widened by the matched ITE
        (``estimate_model_ite(widen_by_matching=True)``; the hull's take the observed value either way). The
        denoised expression and batch effect use the observed value either way and stay. The choice is saved with
        the NDreamer (``settings["factual"]``).
        """
        return self.effects.factual

    @factual.setter
    def factual(self, value: str) -> None:
        value = V.choice("factual", value, FACTUAL_CHOICES)
        if value == self.effects.factual:
            return
        self.effects.set_factual(value)
        self.settings["factual"] = value
        self._drop_ite_results()
        self._drop_matched_model_bounds()  # a model route's bounds widened by the matched ITE (representation.py)

    def _drop_ite_results(self) -> None:
        """Forget the ITE layers (their bounds too), how they were made, their clusters, and the CATE tables."""
        prefixes = tuple(f"ite_{c}" for c in self.design.treatments)
        for layer in [name for name in self.results.layers if name.startswith(prefixes)]:
            del self.results.layers[layer]
        for key in [k for k in self.results.uns if k.startswith("cate_") or k == ITE_SETTINGS]:
            del self.results.uns[key]
        self.results.obs.drop(columns=CLUSTER_KEY, errors="ignore", inplace=True)

    def _matched_effects(self):
        """The matching state, with the representation's embedding set (computed once when missing)."""
        if not self.effects.has_embedding:
            self.get_modifier_space()
        return self.effects

    def _effects(self, nearest_neighbor: int, bandwidth: float, interval: float | None = None) -> dict:
        return self._matched_effects().effects(nearest_neighbor, bandwidth, interval)

    def _selection(self, indices, gene_list) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Positions of the cells and genes asked for (None: all of them); a selection of nothing is refused."""
        cells = None if indices is None else cell_positions(self.results.n_obs, indices, self.results.obs_names,
                                                             "the results")
        columns = gene_positions(self.genes, gene_list, "the results",
                                 "NDreamer keeps its genes in nd.genes (pass keep_genes= to keep others).")
        for name, chosen in (("indices", cells), ("gene_list", columns)):
            what = "cell" if name == "indices" else "gene"
            if chosen is not None and len(chosen) == 0:
                raise ValueError(f"{name} selects nothing; pass at least one {what}, or None for all.")
            # the result is an AnnData indexed by cell and gene names: a repeat would give it repeated names
            if chosen is not None and len(np.unique(chosen)) < len(chosen):
                names = self.results.obs_names if name == "indices" else self.genes
                repeated = list(dict.fromkeys(names[p] for p in chosen[pd.Index(chosen).duplicated()]))[:5]
                raise ValueError(f"{name} names the {what}(s) {repeated} more than once; the result is an AnnData "
                                 f"indexed by {what} names, so ask for each {what} once.")
        return cells, columns

    def _subset_result(self, cells, columns, layers: dict) -> anndata.AnnData:
        """A new AnnData of the cells and genes selected by :meth:`_selection`, with ``layers``."""
        obs = self.results.obs if cells is None else self.results.obs.iloc[cells]
        genes = self.genes if columns is None else self.genes[columns]
        # a shrunk estimate_ite's clusters belong to the layers stored in results, not to these
        return anndata.AnnData(obs=obs.drop(columns=CLUSTER_KEY, errors="ignore"), var=pd.DataFrame(index=genes), layers=layers)

    def _effects_of(self, names: list[str], nearest_neighbor: int, bandwidth: float, indices, gene_list,
                    interval: float | None = None, shrink: str | None = None, ite_of=None) -> anndata.AnnData:
        """A new AnnData of the cells and genes asked for, with the effects ``names`` as layers (``ite_of``: the
        treatments whose ITE layers are all of them, computed alone)."""
        cells, columns = self._selection(indices, gene_list)
        effects = self._matched_effects().effects_of(nearest_neighbor, bandwidth, cells, columns, interval,
                                                     ite_of=ite_of)
        if shrink is None:
            return self._subset_result(cells, columns, {n: effects[n] for n in names})
        effects = self.effects.shrunk({n: effects[n] for n in names}, nearest_neighbor, bandwidth, cells, columns,
                                      None if interval is None else interval_level(interval))
        result = self._subset_result(cells, columns, effects)
        self._record_clusters(result.obs, cells)
        return result

    def decompose_batch_effect(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH,
                               indices=None, gene_list=None) -> anndata.AnnData:
        """Layers ``denoised`` and ``batch_effect`` (observed - denoised) of ``results``, or of the cells asked for.

        Parameters
        ----------
        nearest_neighbor, bandwidth
            k of the matching (1: causal matching) and the kernel bandwidth for k > 1.
        indices, gene_list
            Cells (positions, a boolean mask or names) and genes to compute, as in scvi-tools' getters.
            With either, only those are computed and returned in a new AnnData, and ``results`` is left
            as it is: on large data, no cells x genes array of the whole data is built. For every cell,
            :meth:`write_effects` writes the layers to disk in blocks of cells.

        Returns
        -------
        anndata.AnnData
            :attr:`results`, or the new AnnData of the cells and genes asked for.
        """
        if indices is not None or gene_list is not None:
            cells, columns = self._selection(indices, gene_list)
            return self._subset_result(cells, columns,
                                       self._matched_effects().denoised_of(nearest_neighbor, bandwidth, cells, columns))
        effects = self._effects(nearest_neighbor, bandwidth)
        self.results.layers["denoised"] = effects["denoised"]
        self.results.layers["batch_effect"] = effects["batch_effect"]
        return self.results

    def _record_clusters(self, obs: pd.DataFrame, cells=None) -> None:
        """``obs[CLUSTER_KEY]``: the cluster whose shrinkage moved each cell's ITE."""
        labels = self.effects.clusters()
        obs[CLUSTER_KEY] = pd.Categorical(labels if cells is None else labels[cells])

    def estimate_ite(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH,
                     indices=None, gene_list=None, interval: float | None = None,
                     shrink: str | None = K.SHRINK) -> anndata.AnnData:
        """Layers ``ite_<condition>`` of ``results`` for every non-control condition, for every cell.

        Parameters
        ----------
        nearest_neighbor, bandwidth, indices, gene_list
            As for :meth:`decompose_batch_effect`.
        interval
            A level such as 0.9: also layers ``ite_<condition>_q05`` and ``_q95``, the bounds of a
            Student t interval built from the spread of each cell's matched cells
            (:mod:`~pyro_scmodels.ndreamer.effect_intervals`). It holds the measurement noise of the
            cell and of its matches, not how far the matches' state is from the cell's: on
            ``datasets.simulate(3000, 500, effect_modifier=1.0)`` its 90 % bounds held the true effect
            in 91-93 % of the stimulated cells' entries of responding types and genes when matched in a
            RegularizedVI latent (``from_model``, whose ``factual="matched"`` takes a cell's own batch and
            condition from its matched cells too) and 83-85 % in NDreamer's own space with the cell's own
            counts (87-90 % with ``factual="matched"``), all unshrunk; at today's defaults (the shrinkage, and
            ``"matched"`` for the default network) 91-95 % and 87-91 % (six seeds). The control cells' entries of the same types and genes
            are covered less, 83-86 % in the RegularizedVI latent (three seeds): their counterfactual comes
            from treated matches whose state differs from theirs. Entries with no true effect are covered
            99.7 %. Needs ``nearest_neighbor >= 2``. With ``shrink``, the bounds are centred on the shrunk
            ITE and their variance is the matched one plus the posterior variance of the cell's cluster mean
            (:func:`~pyro_scmodels.ndreamer.ite_shrinkage.widened_bounds`); they leave out the uncertainty of
            the fitted prior itself (its weights and centre are taken as known).
        shrink
            ``"clusters"`` (default): empirical-Bayes shrinkage of each cluster's mean ITE across genes
            (docs/ndreamer.md, "Shrunk effects"); ``None``: the matched ITE as it is. The cells are clustered
            by Leiden (resolution 0.5) on the matching space, every condition together; per cluster and gene
            the mean ITE gets a standard error from the matching, a prior (the median over genes plus a
            normal scale mixture, fitted across genes) is fitted, and every cell of the cluster moves by the
            posterior mean minus the mean, so differences between its cells are kept. Each cell's cluster is
            recorded in ``obs["ite_shrinkage_cluster"]`` of the result. It assumes that within
            a cluster most genes respond little or not at all and the rest share a few scales. On
            ``datasets.simulate(3000, 500, effect_modifier=1.0)`` (six seeds) it cut the false effect in
            non-responding types from 0.05-0.07 of the true effect to about 0.01, raised CATE r from
            0.94-0.96 to 0.98 and lowered the slope of estimate on truth by 0.01-0.03 (benchmarks/RESULTS.md,
            "Shrunk matched effects").

        Returns
        -------
        anndata.AnnData
            :attr:`results`, or a new AnnData of the cells and genes asked for.
        """
        shrink = V.choice("shrink", shrink, SHRINK_CHOICES, allow_none=True)
        names = [f"ite_{c}" for c in self.design.treatments]
        if interval is not None:
            names += [f"ite_{c}_{bound}" for c in self.design.treatments for bound in bound_names(interval_level(interval))]
            _check_interval_neighbours(nearest_neighbor, self.design)
        if indices is not None or gene_list is not None:
            # the ITE layers alone: no denoised expression or batch effect (estimate_cate asks 10,000 cells at a time)
            return self._effects_of(names, nearest_neighbor, bandwidth, indices, gene_list, interval, shrink,
                                    ite_of=list(self.design.treatments))
        effects = self._effects(nearest_neighbor, bandwidth, interval)
        clusters = None
        if shrink is not None:
            effects = self.effects.shrunk({n: effects[n] for n in names}, nearest_neighbor, bandwidth,
                                          level=None if interval is None else interval_level(interval))
            clusters = pd.Categorical(self.effects.clusters())
        # everything is computed: results change only from here, so a failure above leaves an earlier call's whole
        # result (its layers, clusters and record) as it was
        self.results.obs.drop(columns=CLUSTER_KEY, errors="ignore", inplace=True)  # these layers may not be shrunk
        # bounds of an earlier call (another k or level) would not belong to these effects
        for c in self.design.treatments:
            for stale in [n for n in self.results.layers if n.startswith(f"ite_{c}_q")]:
                del self.results.layers[stale]
        for name in names:
            self.results.layers[name] = effects[name]
        if clusters is not None:
            self.results.obs[CLUSTER_KEY] = clusters
        # which matching the layers hold, so that a CATE of another matching does not read them
        self.results.uns[ITE_SETTINGS] = ite_record(nearest_neighbor, bandwidth, shrink,
                                                    None if interval is None else interval_level(interval), self.factual)
        return self.results

    def write_effects(self, path: str, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH,
                      chunk_cells: int = K.WRITE_CHUNK_CELLS, overwrite: bool = False,
                      interval: float | None = None, indices=None, gene_list=None, shrink: str | None = K.SHRINK) -> str:
        """Write denoised expression, batch effect and every ITE of every cell to an ``.h5ad``, in blocks of cells.

        For data too large for cells x genes arrays in memory: each block of ``chunk_cells`` cells is
        computed from the matches and written as rows of the file's layers, so memory holds one block.
        The file (``obs``, the genes as ``var``, ``obsm``, layers ``denoised``, ``batch_effect``,
        ``ite_<condition>``, and with ``interval`` its bounds) appears complete or not at all; read it with
        ``anndata.read_h5ad(path, backed="r")`` to keep the layers on disk. Its ``uns["ite_matching"]`` records
        how the layers were made, as :meth:`estimate_ite` records it in ``results.uns``: ``nearest_neighbor``,
        ``bandwidth``, ``shrink`` (``"none"``: not shrunk) and, with ``interval``, its level.

        Parameters
        ----------
        path
            The ``.h5ad`` file to write; its folder must exist.
        nearest_neighbor, bandwidth
            As for :meth:`decompose_batch_effect`.
        chunk_cells
            Cells computed and written at a time.
        overwrite
            Replace an existing file.
        interval
            A level such as 0.9: also each ITE's interval bounds, as in :meth:`estimate_ite`.
        indices, gene_list
            Only these cells (positions, a boolean mask or names; in the order given) and genes, as for
            :meth:`decompose_batch_effect`; default every cell and every gene.
        shrink
            As for :meth:`estimate_ite`: ``"clusters"`` (default) shrinks every ITE (and widens its bounds);
            the file's ``obs["ite_shrinkage_cluster"]`` then records each cell's cluster. ``None``: unshrunk.

        Returns
        -------
        str
            ``path``.
        """
        level = None if interval is None else interval_level(interval)
        if level is not None:
            _check_interval_neighbours(nearest_neighbor, self.design)
        chunk_cells = V.positive_int("chunk_cells", chunk_cells)
        shrink = V.choice("shrink", shrink, SHRINK_CHOICES, allow_none=True)
        cells, columns = self._selection(indices, gene_list)
        self._matched_effects()
        return write_effects_h5ad(self, path, nearest_neighbor, bandwidth, chunk_cells, overwrite, level, cells,
                                  columns, shrink, uns={ITE_SETTINGS: ite_record(nearest_neighbor, bandwidth, shrink, level,
                                                                     self.factual)})

    def estimate_cate(self, groupby: str, condition: str | None = None, min_cells: int = K.MIN_CELLS_FOR_CATE,
                      nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH,
                      shrink: str | None = K.SHRINK) -> pd.DataFrame:
        """Per group of ``results.obs[groupby]`` and gene: mean ITE, sign test, z test, BH-adjusted p-values.

        Parameters
        ----------
        groupby
            Column of ``results.obs`` holding the cell groups.
        condition
            Treatment condition (default the first, in order of appearance in the cells). The mean ITE, its signs
            and ``n_cells`` are over every cell of the group, whatever its own condition (each cell has an ITE of
            each treatment); with three or more conditions that includes the other treatments' cells.
        min_cells
            Fewest cells of ``condition`` and of the control a group must hold (at least 2). Smaller groups are
            left out of the table, with a warning that names them and their sizes.
        nearest_neighbor, bandwidth
            Matching of the ITE. The ``ite_<condition>`` layer of :meth:`estimate_ite` is used when it
            was made with the same two and the same ``shrink``; otherwise the ITE is computed 10,000 cells of a group at a time
            and summed per gene, so that no cells x genes array beyond a block is built.
        shrink
            As for :meth:`estimate_ite`: the table's mean ITE and its tests read the shrunk per-cell ITE
            (the z test's standard error still comes from the observed expression).

        Returns
        -------
        pandas.DataFrame
            See :func:`~pyro_scmodels.ndreamer.estimate_cate` (the tests' standard error comes from the group's
            treated and control cells' observed expression, not from the spread of the per-cell ITEs, which share
            their matched cells); also stored in ``results.uns``.
        """
        # the labels are text: a number names its label (1 was refused), and 0 is a label, not "none given"
        condition = self.design.treatments[0] if condition is None else str(condition)
        if condition not in self.design.treatments:
            raise ValueError(f"Unknown condition {condition!r}; treatments: {self.design.treatments}.")
        min_cells = V.positive_int("min_cells", min_cells)
        shrink = V.choice("shrink", shrink, SHRINK_CHOICES, allow_none=True)
        if min_cells < 2:  # the z test's standard error takes each arm's variance
            raise ValueError(f"min_cells={min_cells}: a CATE group needs at least 2 cells of the treatment and of the "
                             "control (each arm's variance enters the standard error); pass min_cells=2 or more.")
        V.group_column(self.results.obs, groupby, "groupby", "results.obs", missing_hint=(
            f"{RESULTS_OBS} is the NDreamer's copy of the cells' obs, made when it was built (a column added to adata.obs "
            f"later is not there): add it with nd.results.obs[{groupby!r}] = adata.obs[{groupby!r}].to_numpy() (the same "
            "cells, in order)."))
        refuse_slash_in_groupby(groupby)
        groups = labels_of(self.results.obs, [groupby], "groupby", RESULTS_OBS)[:, 0]
        layer = f"ite_{condition}"
        kept = groups_with_both_conditions(groups, self.design.condition, condition, self.design.control_name, min_cells)
        made_with = self.results.uns.get(ITE_SETTINGS, {})
        same = (made_with.get("nearest_neighbor") == V.positive_int("nearest_neighbor", nearest_neighbor)
                and made_with.get("bandwidth") == float(bandwidth)
                and made_with.get("shrink", NO_SHRINK) == (shrink or NO_SHRINK)
                # a record from before factual could change was made with this NDreamer's
                and made_with.get("factual", self.factual) == self.factual
                # layers saved before the arms were averaged over shared batches differ where a batch holds one arm
                and (made_with.get("arms") == ITE_ARMS or self.design.common_batches(condition)
                     == self.design.batches_with[condition] == self.design.batches_with[self.design.control_name]))
        stored = layer in self.results.layers and same
        labels = np.asarray(self.design.condition).astype(str)
        arms = np.select([labels == str(condition), labels == str(self.design.control_name)], [TREATED, CONTROL], OTHER)
        # a block of one group's cells at a time, summed: no cells x genes array beyond a block; the observed
        # expression gives the standard error (the ITEs share their matched cells: cate.py)
        tables = []
        for group in [g for g in dict.fromkeys(groups) if g in set(kept)]:  # in order of appearance
            cells, sums = np.flatnonzero(groups == group), CateSums(len(self.genes))
            for start in range(0, cells.size, K.WRITE_CHUNK_CELLS):
                block = cells[start : start + K.WRITE_CHUNK_CELLS]
                ite = (self.results.layers[layer][block] if stored
                       else self.estimate_ite(nearest_neighbor, bandwidth, indices=block, shrink=shrink).layers[layer])
                sums.add(ite, self.expression[block], arms[block])  # sparse rows: densified in parts there
            tables.append(sums.table(group, self.genes))
        table = pd.concat(tables, ignore_index=True)
        self.results.uns[f"cate_{condition}_{groupby}"] = table
        return table
