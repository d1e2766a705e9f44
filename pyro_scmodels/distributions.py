"""Count distributions in the parameterisation the models use."""

from __future__ import annotations

from typing import NamedTuple

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.autograd.function import once_differentiable

from .data.count_positions import CountPositions


def one_hot_rows(index: torch.Tensor, n_rows: int, like: torch.Tensor) -> torch.Tensor:
    """``(cells, n_rows)`` one-hot matrix of ``index``, with ``like``'s dtype and device.

    Written as a scatter rather than ``F.one_hot``, which checks the index range on the host (on a GPU, a wait
    for every queued kernel each time).
    """
    return like.new_zeros(index.shape[0], n_rows).scatter_(1, index.unsqueeze(1), 1.0)


def select_rows(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``weights[..., None] * table[index]`` for a small table (a row per category, e.g. per batch).

    The rows are gathered forwards; backwards the table's gradient is a one-hot matrix product, not
    the scatter-add of indexing (several times faster on the CPU for a cells x genes result), and a
    per-cell weight's gradient comes from one product with the table (:class:`_SelectedRows`).
    ``weights`` may carry leading sample dimensions.
    """
    if table.shape[-2] == 1:
        rows = table.expand(index.shape[0], table.shape[-1])
        return rows if weights is None else weights.unsqueeze(-1) * table
    if table.dim() == 2:
        return _SelectedRows.apply(table, index, weights)
    # a table with leading dimensions (draws of a grouped parameter): the product broadcasts over them
    onehot = one_hot_rows(index, table.shape[-2], table)
    return (onehot if weights is None else onehot * weights.unsqueeze(-1)) @ table


class _SelectedRows(torch.autograd.Function):
    """``apply(table, index, weights)`` = ``weights[..., None] * table[index]`` (weights may be None).

    A product with a one-hot matrix gives the same values, but with few rows (a handful of batches) its
    forward pass, (cells x rows) @ (rows x genes), ran at a fraction of the speed of a gather on the CPU.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        rows = table.index_select(0, index)
        ctx.save_for_backward(table, index, weights)
        return rows if weights is None else rows * weights.unsqueeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        table, index, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        onehot = one_hot_rows(index, table.shape[0], grad)
        if ctx.needs_input_grad[0]:
            # sum over cells (and samples) of each cell's weighted gradient, into its row
            selector = onehot if weights is None else onehot * weights.unsqueeze(-1)
            grad_table = selector.reshape(-1, table.shape[0]).T @ grad.reshape(-1, table.shape[1])
        if weights is not None and ctx.needs_input_grad[2]:
            # d/dw_n = sum_g grad_ng table[index_n, g]: the product with every row, then the cell's own
            grad_weights = ((grad @ table.T) * onehot).sum(-1)
        return grad_table, None, grad_weights


class CountTerms(NamedTuple):
    """What :class:`GammaPoissonMean`'s log p(x) holds of the counts and theta alone, at the non-zero counts of one
    counts tensor (:meth:`GammaPoissonMean.count_terms`): computed once, for the means of many draws of z scored at
    the same theta (importance ratios), instead of once per draw.

    ``counts``, ``theta`` and ``group`` are the tensors they were computed from (the distribution given them checks
    its own by identity); ``where`` and ``cell`` the flat positions of the non-zero counts and their cells, ``x`` and
    ``theta_x`` the counts and theta there, and ``lgammas`` lgamma(x + theta), lgamma(theta) and lgamma(x + 1) there
    (kept apart, so that each count's term is summed in the order of a log p computed without them, to the bit).
    """

    counts: torch.Tensor
    theta: torch.Tensor
    group: torch.Tensor | None
    where: torch.Tensor
    cell: torch.Tensor
    x: torch.Tensor
    theta_x: torch.Tensor
    lgammas: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class GammaPoissonMean(dist.GammaPoisson):
    """``GammaPoisson(concentration=theta, rate=theta / mu)``, parameterised by its mean ``mu``.

    The same distribution as Pyro's ``GammaPoisson`` (negative binomial with mean ``mu`` and
    variance ``mu + mu^2 / theta``); only ``log_prob`` is written differently::

        log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                   + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))

    Only ``theta log(theta / (theta + mu)) = -theta log1p(mu / theta)`` is computed at every
    entry; the rest, ``x log(mu / (theta + mu)) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``,
    is 0 wherever x = 0 and is computed at the non-zero counts only. Single-cell counts are
    mostly zeros: this halves the passes over every cell and gene (forward and backward), and
    lgamma (a digamma in the backward pass), once the costliest function of a training step,
    runs only at the counts. Terms of ``theta`` alone are computed per gene (or per gene and
    group) before they are spread over the cells. That sparse form needs theta as one row per
    gene (shape ``(G,)`` or ``(1, G)``) or, with ``group``, a 2-D groups x genes table; any
    other theta takes the dense form, with the same values. :meth:`log_prob_sum_genes` gives
    each cell's sum over genes without the cells x genes tensor of terms (for a cells x genes mean,
    the x = 0 term through :class:`ZeroCountRowSums`, whose gradient is written out).

    Parameters
    ----------
    mean
        Mean mu (positive), cells x genes.
    concentration
        Inverse overdispersion theta (positive): a shape that broadcasts with ``mean``, or, with
        ``group``, a groups x genes table.
    group
        Optional group of each cell (long tensor): cell n uses row ``group[n]`` of
        ``concentration``.
    positions
        Optional :class:`CountPositions`: ``(flat, column, row)`` long tensors locating every
        non-zero count of one cells x genes tensor of counts (its ``counts``), each position once:
        the flat position, the gene and the cell. A minibatch read from sparse counts knows them
        from its CSR structure, which is 10-20 times cheaper than searching the dense counts; they
        may also list zero counts (their terms are 0). Used only when :meth:`log_prob` is given
        that very tensor (``value is positions.counts``); any other value (counts given through
        ``poutine.condition``, replicate draws, a sliced or replaced minibatch) has its non-zeros
        searched for, so ``log_prob(value)`` depends on ``value`` alone.
    """

    def __init__(self, mean: torch.Tensor, concentration: torch.Tensor, group: torch.Tensor | None = None,
                 positions: CountPositions | None = None, validate_args=None):
        self._mu = mean
        self._theta = concentration
        self._group = group
        if positions is not None and not isinstance(positions, CountPositions):
            raise TypeError("positions must be a CountPositions (the positions and the counts tensor they locate), "
                            f"got {type(positions).__name__}: wrap them as CountPositions(positions, counts).")
        self._positions = positions
        theta_shape = concentration.shape if group is None else (group.shape[0], concentration.shape[-1])
        batch_shape = torch.broadcast_shapes(mean.shape, theta_shape)
        TorchDistribution.__init__(self, batch_shape, validate_args=validate_args)

    def _per_cell(self, per_gene: torch.Tensor) -> torch.Tensor:
        return per_gene if self._group is None else select_rows(per_gene, self._group)

    @property
    def concentration(self) -> torch.Tensor:
        return self._per_cell(self._theta).expand(self.batch_shape)

    @property
    def rate(self) -> torch.Tensor:
        return (self._per_cell(self._theta) / self._mu).expand(self.batch_shape)

    @property
    def _gamma(self) -> dist.Gamma:  # used by GammaPoisson.sample
        return dist.Gamma(self.concentration, self.rate, validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self._mu.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        return (self._mu + self._mu.pow(2) / self._per_cell(self._theta)).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GammaPoissonMean, _instance)
        batch_shape = torch.Size(batch_shape)
        new._mu = self._mu.expand(batch_shape)
        new._theta = self._theta
        new._group = self._group
        new._positions = self._positions
        TorchDistribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor, fixed: CountTerms | None = None) -> torch.Tensor:
        """log p(``value``) at every entry; ``fixed`` as for :meth:`log_prob_sum_genes`."""
        split = self._split_log_prob(value, fixed=fixed)
        if split is None:
            return self._dense_log_prob(value)
        zero_count, where, count_terms, shape, _ = split
        return zero_count.expand(shape).reshape(-1).index_add(0, where, count_terms).reshape(shape)

    @classmethod
    def count_terms(cls, counts: torch.Tensor, concentration: torch.Tensor, group: torch.Tensor | None = None,
                    positions: CountPositions | None = None) -> CountTerms | None:
        """The terms of log p(``counts``) that do not depend on the mean, for :meth:`log_prob_sum_genes`'s ``fixed``.

        Parameters
        ----------
        counts
            Counts, cells x genes.
        concentration, group, positions
            As for the constructor.

        Returns
        -------
        CountTerms or None
            None where theta takes the dense form (then there is nothing to keep).
        """
        # the terms read no mean: the counts stand in for its shape
        entries = cls(counts, concentration, group, positions, validate_args=False)._count_entries(counts, counts.shape)
        if entries is None:
            return None
        where, cell, x, theta_x, lgamma_theta_x, log_factorial = entries
        return CountTerms(counts, concentration, group, where, cell, x, theta_x,
                          (torch.lgamma(x + theta_x), lgamma_theta_x, log_factorial))

    def log_prob_sum_genes(self, value: torch.Tensor, fixed: CountTerms | None = None) -> torch.Tensor:
        """``log_prob(value).sum(-1)``, without the cells x genes tensor of every term.

        Parameters
        ----------
        value
            Counts, cells x genes (or with leading sample dimensions).
        fixed
            :meth:`count_terms` of ``value`` at this distribution's theta and group (checked): only the terms with
            the mean are computed; the same value, to the bit.

        Returns
        -------
        torch.Tensor
            log p of each cell's counts: the shape of ``value`` without its last axis.
        """
        # one cells x genes mean (no sample dimensions): the x = 0 term's row sums with their gradient written out
        rows_only = self._mu.dim() == 2 and value.dim() == 2 and self._mu.shape == value.shape
        split = self._split_log_prob(value, zero_count_rows=rows_only, fixed=fixed)
        if split is None:
            return self._dense_log_prob(value).sum(-1)
        zero_count, where, count_terms, shape, cell = split
        per_row = (zero_count if rows_only else zero_count.expand(shape).sum(-1)).reshape(-1)
        if len(shape) > 2:  # with sample dimensions a count's row is its sample's cell, not the cell alone
            with torch.no_grad():
                cell = torch.div(where, shape[-1], rounding_mode="floor")
        return per_row.index_add(0, cell, count_terms).reshape(shape[:-1])

    def _dense_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Every term at every entry: for a theta that is not one row per gene (or per group)."""
        mu, theta = self._mu, self._per_cell(self._theta)
        theta_log_theta = self._per_cell(self._theta * self._theta.log())  # per gene (and group), then spread
        dense = theta_log_theta - (value + theta) * torch.log(theta + mu) + value * mu.log()
        with torch.no_grad():
            log_factorial = torch.lgamma(value + 1)  # a constant of the data
        return dense + torch.lgamma(value + theta) - torch.lgamma(theta) - log_factorial

    def _split_log_prob(self, value: torch.Tensor, zero_count_rows: bool = False, fixed: CountTerms | None = None):
        """The terms at every entry, the flat positions of the non-zero counts and the terms there, the shape and
        each count's cell; None where the sparse form does not apply (see :meth:`_gamma_positions`).

        With ``zero_count_rows`` (a cells x genes mean and value), the first item is each cell's sum of the x = 0
        terms instead of the terms (:class:`ZeroCountRowSums`). With ``fixed`` (:meth:`count_terms`), the terms
        without the mean are read from it.
        """
        if self._validate_args:
            self._validate_sample(value)
        mu = self._mu
        shape = torch.broadcast_shapes(self.batch_shape, value.shape)  # mu's and the spread theta's, with value's
        if fixed is None:
            entries = self._count_entries(value, shape)
            if entries is None:
                return None
            where, cell, x, theta_x, lgamma_theta_x, log_factorial = entries
        else:
            if not (fixed.counts is value and fixed.theta is self._theta and fixed.group is self._group
                    and tuple(value.shape) == tuple(shape)):
                raise ValueError("fixed holds the count terms of other counts, theta or group than these: compute "
                                 "them with GammaPoissonMean.count_terms(counts, theta, group, positions) of these.")
            where, cell, x, theta_x = fixed.where, fixed.cell, fixed.x, fixed.theta_x
        theta_table = self._theta.reshape(-1, self._theta.shape[-1])
        # every entry: the x = 0 term (see the class docstring); the other terms at the non-zero counts below
        if zero_count_rows:
            zero_count = ZeroCountRowSums.apply(mu, theta_table, self._group)
        else:
            # -theta and 1 / theta per gene (and group), then spread: a product's backward pass is cheaper than a
            # quotient's, and no pass over every entry negates
            zero_count = self._per_cell(-self._theta) * torch.log1p(mu * self._per_cell(self._theta.reciprocal()))
        mu_x = mu.expand(shape).reshape(-1).index_select(0, where)
        lgamma_x_theta, lgamma_theta_x, log_factorial = ((torch.lgamma(x + theta_x), lgamma_theta_x, log_factorial)
                                                         if fixed is None else fixed.lgammas)
        count_terms = x * (mu_x.log() - torch.log(theta_x + mu_x)) + lgamma_x_theta - lgamma_theta_x - log_factorial
        return zero_count, where, count_terms.to(zero_count.dtype), shape, cell

    def _count_entries(self, value: torch.Tensor, shape: torch.Size):
        """At the non-zero counts of ``value``: their flat positions and cells, x, theta, lgamma(theta) and
        lgamma(x + 1), none of which depends on the mean; None for the dense form."""
        positions = self._gamma_positions(value, shape)
        if positions is None:
            return None
        flat_value, where, column, cell = positions
        x = flat_value.index_select(0, where)
        theta_table = self._theta.reshape(-1, self._theta.shape[-1])
        # lgamma(theta) once per gene (and group), then spread to the counts: not once per count, and
        # its digamma in the backward pass likewise
        lgamma_table = torch.lgamma(theta_table)
        # index_select rather than indexing: its backward is an index_add, several times faster on
        # the CPU than the accumulating index_put of advanced indexing
        if self._group is None:
            theta_x, lgamma_theta_x = theta_table[0].index_select(0, column), lgamma_table[0].index_select(0, column)
        else:
            flat = self._group.index_select(0, cell) * theta_table.shape[-1] + column
            theta_x, lgamma_theta_x = theta_table.reshape(-1).index_select(0, flat), lgamma_table.reshape(-1).index_select(0, flat)
        with torch.no_grad():
            log_factorial = torch.lgamma(x + 1)
        return where, cell, x, theta_x, lgamma_theta_x, log_factorial

    def _gamma_positions(self, value: torch.Tensor, shape: torch.Size):
        """The counts flattened, the flat positions of the non-zero ones, their gene and cell; None for the dense form.

        The sparse form needs theta as one row per gene (or one per group, with ``group``) and
        the cells on the second-to-last axis; other shapes take the dense form.
        """
        theta, n_genes = self._theta, shape[-1]
        if theta.dim() == 0 or theta.shape[-1] != n_genes or len(shape) < 2:
            return None
        if (self._group is None and theta.numel() != n_genes) or (self._group is not None and theta.dim() != 2):
            return None  # e.g. a theta per cell, or draws of a grouped table: the dense form
        flat_value = value.expand(shape).reshape(-1)
        # the positions describe one tensor: an identity check (free), not a shape check, so that other counts of
        # the same shape (conditioned, replicated, sliced or replaced) are never scored at that tensor's non-zeros
        if self._positions is not None and value is self._positions.counts and tuple(value.shape) == tuple(shape):
            where, column, cell = self._positions  # given by the minibatch (read off its sparse rows)
            return flat_value, where, column, cell
        with torch.no_grad():
            where = flat_value.nonzero().squeeze(1)
            column = where % shape[-1]
            cell = (where // shape[-1]) % shape[-2]
        return flat_value, where, column, cell


class ZeroCountRowSums(torch.autograd.Function):
    """Each cell's ``sum_g -theta log1p(mu / theta)`` (the negative binomial's x = 0 term), gradient written out.

    With ``C = mu / theta``: d/dmu = -1 / (1 + C) and d/dtheta = C / (1 + C) - log1p(C). Autograd of the same
    expression keeps the spread -theta and 1 / theta tables and makes about eight passes over the cells x genes
    tensors backwards; written out, the backward pass makes five (one of them a matrix product that only reads),
    and the forward pass sums over genes with one matrix product against the theta table instead of spreading
    -theta and multiplying.

    ``apply(mu, theta_table, group)``: ``mu`` cells x genes, ``theta_table`` groups x genes (one row without
    ``group``), ``group`` the row of each cell or None. Returns a vector of one value per cell.
    """

    @staticmethod
    def forward(ctx, mu: torch.Tensor, theta_table: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        onehot = None if group is None else one_hot_rows(group, theta_table.shape[0], mu)
        inverse = theta_table.reciprocal()
        ratio = mu * inverse if onehot is None else (onehot @ inverse).mul_(mu)  # C = mu / theta
        log_term = torch.log1p(ratio)
        # sum_g theta_{e(n), g} log1p(C_ng): every row's product with every theta row (few), then its own row's
        per_row = log_term @ theta_table.T
        per_row = per_row[:, 0] if onehot is None else (per_row * onehot).sum(-1)
        ctx.save_for_backward(ratio, log_term, theta_table, onehot)
        return -per_row

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ratio, log_term, theta_table, onehot = ctx.saved_tensors
        weight = grad.unsqueeze(-1)
        inverse = ratio.add(1.0).reciprocal_()  # 1 / (1 + C)
        # d/dtheta summed over each group's cells: sum_n g_n (1 - 1 / (1 + C) - log1p(C))
        total = log_term + inverse  # out of place: the saved tensors stay valid for a second backward pass
        if onehot is None:
            grad_theta = (grad.sum() - grad @ total).unsqueeze(0)
        else:
            weighted = onehot * weight
            grad_theta = weighted.sum(0).unsqueeze(-1) - weighted.T @ total
        grad_mu = inverse.mul_(weight.neg())
        return grad_mu, grad_theta.reshape(theta_table.shape), None
