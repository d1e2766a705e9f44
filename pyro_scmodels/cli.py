"""Command line: ``pyro-scmodels demo``, ``pyro-scmodels fit`` and ``pyro-scmodels ndreamer``.

``demo`` simulates data with known truth (no download needed), fits RegularizedVI and NDreamer
and prints what they recovered; ``fit`` fits RegularizedVI and ``ndreamer`` runs NDreamer on a
user's h5ad file.

``fit`` trains data-parallel when started by ``torchrun`` (``torchrun --nproc_per_node=N -m
pyro_scmodels fit ...``) or with ``--devices N``, which starts ``torchrun`` itself on this machine.
Only rank 0 writes the output folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys

import numpy as np

from . import _validation as V
from ._atomic import atomic_path, write_h5ad
from ._io import OutputFolder, read_h5ad
from .ndreamer._constants import NEAREST_NEIGHBOR
from .training import NonFiniteError

LATENT_KEY = "X_regularizedvi"
NORMALIZED_LAYER = "regularizedvi_normalized"


class _CurrentStderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is at the time of each message (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


# the numeric options of each command, checked before any file is read or written
_ARGUMENT_CHECKS = {
    "demo": {"n_cells": V.positive_int, "n_genes": V.positive_int, "epochs": V.positive_int,
             "batch_size": V.positive_int, "lr": V.positive_float, "seed": V.non_negative_int},
    "fit": {"n_latent": V.positive_int, "n_hidden": V.positive_int, "n_layers": V.positive_int,
            "max_epochs": V.positive_int, "batch_size": V.positive_int, "lr": V.positive_float,
            "seed": V.non_negative_int, "devices": V.positive_int, "checkpoint_every": V.positive_int,
            "latent_independence": V.non_negative_float, "global_lr_factor": V.positive_float},
    "ndreamer": {"num_hvg": V.positive_int, "epochs": V.positive_float, "batch_size": V.positive_int,
                 "nearest_neighbor": V.positive_int, "bandwidth": V.positive_float, "seed": V.non_negative_int},
}


def check_arguments(args) -> None:
    """Check the numeric options of ``args.command`` (None: the option's default applies).

    Parameters
    ----------
    args
        Parsed command line (:func:`build_parser`).

    Raises
    ------
    TypeError, ValueError
        From :mod:`pyro_scmodels._validation`, naming the option (e.g. ``--batch-size``).
    """
    for name, check in _ARGUMENT_CHECKS.get(args.command, {}).items():
        V.optional(check, "--" + name.replace("_", "-"), getattr(args, name))


# names inside an output folder that mark results of an earlier run
RESULT_NAMES = ("results.h5ad", "model", "checkpoint", "network.pt", "ndreamer")


def _prepare_output(folder: OutputFolder, args) -> str:
    """Check the output folder before any work (writable, not a file, no earlier results unless allowed).

    On ``--overwrite`` an old checkpoint is removed, so that a new run does not resume from it.
    """
    resume = getattr(args, "resume", False)
    path = folder.check(overwrite=args.overwrite, resume=resume)
    if args.overwrite and not resume:
        shutil.rmtree(os.path.join(path, "checkpoint"), ignore_errors=True)
    return path


def _check_device(device: str) -> None:
    """The torch device is checked before any folder is made or file read (``--device cuda`` without a GPU)."""
    from .infer import resolve_device

    resolve_device(device)


def _store_results(model, adata, write_normalized: bool = True) -> None:
    adata.obsm[LATENT_KEY] = model.get_latent_representation()
    if write_normalized:
        adata.layers[NORMALIZED_LAYER] = model.get_normalized_expression(return_numpy=True).astype(np.float32)
    # DataFrames keep the category names as columns
    adata.varm["regularizedvi_ambient"] = model.get_ambient_profile()
    adata.varm["regularizedvi_dispersion"] = model.get_dispersion()
    adata.varm["regularizedvi_feature_scaling"] = model.get_feature_scaling()
    adata.obs["regularizedvi_library_size"] = model.get_library_size()
    adata.obs["regularizedvi_ambient_fraction"] = model.get_ambient_fraction()


def write_figures(model, adata, out: str, colour_by: list[str], umap: bool = False) -> list[str]:
    """The latent space coloured by ``colour_by`` and the training curve, as PNGs in ``out``."""
    from .figures import plot_latent, plot_training_curve

    latent = plot_latent(adata.obsm[LATENT_KEY], adata.obs, colour_by, os.path.join(out, "latent.png"),
                         title="RegularizedVI latent", method="umap" if umap else "pca")
    curve = plot_training_curve(model.history, os.path.join(out, "training_curve.png"))
    return [latent, curve]


def run_demo(args, folder: OutputFolder) -> dict:
    """Simulate, fit, compare with the truth (with verdicts), write results, model and figures."""
    from . import demo

    _check_device(args.device)
    out = _prepare_output(folder, args)
    return demo.run(args, out, LATENT_KEY, lambda model, adata: _store_results(model, adata, args.write_normalized),
                    lambda model, adata, folder, colour_by: write_figures(model, adata, folder, colour_by, args.umap))


def run_ndreamer(args, folder: OutputFolder) -> None:
    """NDreamer on a user's h5ad: modifier space, denoised expression, per-cell effects, CATE."""
    from .figures import plot_ite_heatmap
    from .ndreamer import NDreamer
    from .ndreamer._constants import NETWORK_PRESETS

    _check_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("ndreamer trains in one process (its losses compare cells across the whole minibatch); "
                         "run it without torchrun.")
    out = _prepare_output(folder, args)
    # backed: .X stays on disk and is read in blocks of rows (layers are loaded by anndata)
    adata = read_h5ad(args.data, backed="r" if args.backed else None)
    if args.cate_groupby is not None:
        V.present(args.cate_groupby, adata.obs.columns, f"{args.data} obs (--cate-groupby)", "column")
    # the constructor checks keys, the control, and the batch x condition group sizes before training
    nd = NDreamer(adata, args.condition_key, args.control, batch_key=args.batch_key, num_hvg=args.num_hvg,
                  layer=args.layer, batch_size=args.batch_size, device=args.device, seed=args.seed,
                  **NETWORK_PRESETS[args.network])
    nd.train(n_epochs=args.epochs, progress_bar=not args.quiet, checkpoint_dir=os.path.join(out, "checkpoint"))
    nd.get_modifier_space()
    layers = f"denoised, batch_effect, {', '.join('ite_' + c for c in nd.design.treatments)}"
    if args.backed:
        # no cells x genes array of the whole data: the layers are computed and written a block of cells at a time
        nd.save(out, overwrite=True)
        nd.write_effects(os.path.join(out, "effects.h5ad"), args.nearest_neighbor, args.bandwidth, overwrite=True)
        wrote = (f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['X_effect_modifier_space']), "
                 f"{os.path.join(out, 'effects.h5ad')} (layers {layers}), the network")
    else:
        nd.decompose_batch_effect(args.nearest_neighbor, args.bandwidth)
        nd.estimate_ite(args.nearest_neighbor, args.bandwidth)
        # the results are saved before CATE, so that a CATE problem loses nothing
        nd.save(out, overwrite=True)
        wrote = f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['X_effect_modifier_space'], layers {layers}), the network"
    written = []
    for condition in (nd.design.treatments if args.cate_groupby else []):
        table = nd.estimate_cate(args.cate_groupby, condition, nearest_neighbor=args.nearest_neighbor,
                                 bandwidth=args.bandwidth)
        with atomic_path(os.path.join(out, f"cate_{condition}.csv")) as temporary:
            table.to_csv(temporary, index=False)
        written.append(os.path.join(out, f"cate_{condition}.csv"))
        # the heatmap shows each group's mean ITE: the CATE table's, one row per group
        means = table.pivot(index="group", columns="gene", values="mean_ite").reindex(columns=list(nd.genes))
        written.append(plot_ite_heatmap(means.to_numpy(), nd.genes, means.index,
                                        os.path.join(out, f"ite_heatmap_{condition}.png"), condition=condition))
    print(wrote + (f", {', '.join(written)}." if written else "."))


def run_fit(args, folder: OutputFolder) -> None:
    """Fit RegularizedVI on a user's h5ad and write results and the model (rank 0 only, when data-parallel)."""
    from . import RegularizedVI
    from .distributed import is_writer

    _check_device(args.device)
    writer = is_writer()
    # the other ranks of a torchrun launch read the same input, train, and leave the folder to rank 0
    if args.backed and args.write_normalized:
        raise ValueError("--write-normalized writes a dense cells x genes layer, which --backed exists to avoid; drop one "
                         "of them (with a model from --backed, get_normalized_expression(indices=...) gives chosen cells).")
    if args.backed and args.layer is not None:
        raise ValueError(f"--backed keeps only .X on disk; anndata loads --layer {args.layer!r} into memory. Put the raw "
                         "counts in .X of the file (adata.X = adata.layers[...]; adata.write_h5ad(...)) or drop --backed.")
    out = _prepare_output(folder, args) if writer else folder.path
    # backed: .X stays on disk and training reads it in shuffled chunks of cells (layers are loaded by anndata)
    adata = read_h5ad(args.data, backed="r" if args.backed else None)
    # everything is validated here, before training starts
    RegularizedVI.setup_anndata(
        adata, layer=args.layer, batch_key=args.batch_key, ambient_covariate_keys=args.ambient_keys,
        nn_conditioning_covariate_keys=args.nn_conditioning_keys, feature_scaling_covariate_keys=args.feature_scaling_keys,
        dispersion_key=args.dispersion_key, library_size_key=args.library_size_key,
        encoder_covariate_keys=args.encoder_keys, continuous_covariate_keys=args.continuous_keys,
    )
    model = RegularizedVI(adata, n_hidden=args.n_hidden, n_latent=args.n_latent, n_layers=args.n_layers, seed=args.seed,
                          latent_independence=args.latent_independence)
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                global_lr_factor=args.global_lr_factor, checkpoint_dir=os.path.join(out, "checkpoint"), checkpoint_every=args.checkpoint_every,
                progress_bar=not args.quiet, devices=args.devices)
    if not writer:
        return
    if args.backed:  # the results without the counts, which stay in the input file
        import anndata

        adata = anndata.AnnData(obs=adata.obs.copy(), var=adata.var.copy(), obsm=dict(adata.obsm),
                                varm=dict(adata.varm), uns=dict(adata.uns))
    _store_results(model, adata, write_normalized=args.write_normalized)
    write_h5ad(adata, os.path.join(out, "results.h5ad"))
    model.save(os.path.join(out, "model"), overwrite=True)
    with atomic_path(os.path.join(out, "history.csv")) as temporary:
        model.history.to_csv(temporary)
    colour_by = [k for k in (args.batch_key, *(args.ambient_keys or []), args.label_key) if k]
    figures = write_figures(model, adata, out, list(dict.fromkeys(colour_by)), args.umap)
    layers = f", layers['{NORMALIZED_LAYER}']" if args.write_normalized else ""
    print(f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['{LATENT_KEY}']{layers}), {os.path.join(out, 'model')}/, "
          f"history.csv and the figures {', '.join(figures)}.")


DESCRIPTION = """Pyro models of single-cell counts from the command line.

  demo      simulate data with known truth, fit RegularizedVI and NDreamer, report what was recovered
  fit       fit RegularizedVI on your .h5ad of raw counts
  ndreamer  batch-denoised expression and per-cell treatment effects with NDreamer

Run `pyro-scmodels COMMAND --help` for a command's options."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, and keeps the description's line breaks.

    Flags (default False), and options whose help already says what their absence means, show no
    "(default: None)".
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common(parser: argparse.ArgumentParser, overwrite_help: str) -> None:
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; checked before any work")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same results")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also debug messages")


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", formatter_class=_HelpFormatter,
                          help="simulate data with known truth, fit RegularizedVI and NDreamer, report recovery",
                          description="Simulate cells with known truth (no download), fit RegularizedVI and NDreamer, "
                                      "and print each recovered figure beside its truth or baseline with a verdict.")
    demo.add_argument("-o", "--output", default="pyro_scmodels_demo", help="output folder")
    demo.add_argument("--n-cells", type=int, default=3000, help="simulated cells")
    demo.add_argument("--n-genes", type=int, default=500, help="simulated genes")
    demo.add_argument("--epochs", type=int, default=120,
                      help="RegularizedVI training epochs (120 at lr 2e-2 recover what 300 at 1e-2 did, in 40 %% of the steps)")
    demo.add_argument("--batch-size", type=int, default=512, help="cells per training step")
    demo.add_argument("--lr", type=float, default=2e-2, help="learning rate; higher than fit's: small data, few steps")
    demo.add_argument("--skip-ndreamer", action="store_true", help="run only RegularizedVI")
    demo.add_argument("--write-normalized", action="store_true",
                      help="also write the dense normalised-expression layer (float32, cells x genes x 4 bytes)")
    demo.add_argument("--umap", action="store_true", help="draw the latent figure as a UMAP (slower) instead of PCA")
    _common(demo, "replace earlier results in the output folder")


def _add_fit(sub) -> None:
    fit = sub.add_parser("fit", formatter_class=_HelpFormatter, help="fit RegularizedVI on an .h5ad file of raw counts",
                         description="Fit RegularizedVI on raw counts and write the latent space, per-batch ambient "
                                     "profiles, dispersion, scaling, library sizes, the model and figures.")
    fit.add_argument("data", help="input .h5ad with raw counts in .X or --layer")
    fit.add_argument("-o", "--output", required=True, help="output folder (created; checked before training)")
    fit.add_argument("--layer", default=None, help="layer holding the raw counts (default: .X)")
    keys = fit.add_argument_group("covariates (obs columns); each technical effect can have its own key")
    keys.add_argument("--batch-key", default=None,
                      help="shortcut: ambient, dispersion and library-size keys all set to this column; to integrate "
                           "batches add --nn-conditioning-keys with the same column")
    keys.add_argument("--ambient-keys", nargs="+", default=None, help="one ambient RNA profile per category")
    keys.add_argument("--nn-conditioning-keys", nargs="+", default=None, help="columns the decoder is conditioned on")
    keys.add_argument("--feature-scaling-keys", nargs="+", default=None, help="per-gene multiplicative factor per category")
    keys.add_argument("--dispersion-key", default=None, help="gene dispersion per category")
    keys.add_argument("--library-size-key", default=None, help="library-size prior per category")
    keys.add_argument("--encoder-keys", nargs="+", default=None,
                      help="columns the encoder sees (their effects can leak into the latent space)")
    keys.add_argument("--continuous-keys", nargs="+", default=None, help="numeric columns used as continuous covariates")
    keys.add_argument("--label-key", default=None, help="a column (e.g. cell type) to colour the latent figure by")
    net = fit.add_argument_group("model and training")
    net.add_argument("--n-latent", type=int, default=10, help="dimensions of the latent space z")
    net.add_argument("--n-hidden", type=int, default=128, help="width of the encoder and decoder layers")
    net.add_argument("--n-layers", type=int, default=1, help="hidden layers of the encoder and decoder")
    net.add_argument("--latent-independence", type=float, default=0.0,
                     help="weight of an MMD penalty keeping the --encoder-keys out of z (10 for model-based "
                          "counterfactuals of a condition; 0: off)")
    net.add_argument("--max-epochs", type=int, default=None,
                     help="training epochs; default min(round(400 * 20000 / n_cells), 400), as scvi-tools does")
    net.add_argument("--batch-size", type=int, default=1024, help="cells per step; 128 often integrates hard batches better")
    net.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam); raise to 1e-2 for small data")
    net.add_argument("--global-lr-factor", type=float, default=1.0,
                     help="the global sites (ambient, scaling, dispersion) learn at this multiple of --lr (10 integrates)")
    fit.add_argument("--write-normalized", action="store_true",
                     help="also write the dense normalised-expression layer (float32: n_cells x n_genes x 4 bytes)")
    fit.add_argument("--backed", action="store_true",
                     help="train from disk: open the input with anndata's backed='r' (raw counts in .X, not --layer); "
                          "results.h5ad then holds the results without the counts")
    fit.add_argument("--umap", action="store_true", help="draw the latent figure as a UMAP (slower) instead of PCA")
    fit.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT/checkpoint")
    fit.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
    fit.add_argument("--devices", type=int, default=None,
                     help="data-parallel training on N processes of this machine (starts torchrun; under torchrun: "
                          "its --nproc_per_node). Multi-node: see docs/distributed.md")
    _common(fit, "replace earlier results in the output folder (and discard its checkpoint)")


def _add_ndreamer(sub) -> None:
    nd = sub.add_parser("ndreamer", formatter_class=_HelpFormatter,
                        help="NDreamer: batch-denoised expression and per-cell treatment effects",
                        description="Learn an effect-modifier space, match cells across conditions and batches, and "
                                    "write denoised expression, batch effects and per-cell treatment effects (ITE).")
    nd.add_argument("data", help="input .h5ad (raw counts or log-normalised values)")
    nd.add_argument("-o", "--output", required=True, help="output folder (created; checked before training)")
    nd.add_argument("--condition-key", required=True, help="obs column holding the condition")
    nd.add_argument("--control", required=True, help="name of the control condition")
    nd.add_argument("--batch-key", nargs="+", default=None, help="one or more batch columns (each its own effect)")
    nd.add_argument("--layer", default=None, help="layer to read instead of .X")
    nd.add_argument("--backed", action="store_true",
                    help="open the input with anndata's backed='r': .X is read from disk in blocks of rows and never "
                         "densified (the sparse log-normalised matrix is held in memory)")
    nd.add_argument("--num-hvg", type=int, default=2000, help="variable genes used (all genes when fewer)")
    nd.add_argument("--network", choices=["small", "default"], default="default",
                    help="network size: 'default' is the SPEC's (tens of thousands of cells and more); 'small' trains "
                         "much faster and suits a few thousand cells")
    nd.add_argument("--epochs", type=float, default=None, help="passes over the data (default 15)")
    nd.add_argument("--batch-size", type=int, default=1024, help="cells per training step")
    nd.add_argument("--nearest-neighbor", type=int, default=NEAREST_NEIGHBOR,
                    help="matched cells per group, kernel-weighted (1: causal matching, one partner)")
    nd.add_argument("--bandwidth", type=float, default=1.0, help="kernel bandwidth for --nearest-neighbor > 1")
    nd.add_argument("--cate-groupby", default=None,
                    help="obs column (e.g. cell type): write cate_<condition>.csv and an ITE heatmap per group")
    nd.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT/checkpoint")
    _common(nd, "replace earlier results in the output folder")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-scmodels`` argument parser (commands ``demo``, ``fit`` and ``ndreamer``)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="pyro-scmodels", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_fit(sub)
    _add_ndreamer(sub)
    return parser


def _launch_torchrun(argv: list[str], devices: int) -> int:
    """``fit --devices N`` outside torchrun: run the same command under ``torchrun --standalone`` with N processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "pyro_scmodels", *argv]
    print(f"Starting {devices} processes: {' '.join(command[1:])}", file=sys.stderr)
    return subprocess.call(command)


def _rank_prefix() -> str:
    """``" (rank r)"`` in a distributed run, so that each process's error is told apart."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _leave_process_group() -> None:
    """Close the torch.distributed process group that training started (a torchrun launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    """Entry point of the ``pyro-scmodels`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", None) and args.devices > 1 and "WORLD_SIZE" not in os.environ:
        check_arguments(args)
        return _launch_torchrun(argv, args.devices)
    package_logger = logging.getLogger("pyro_scmodels")
    if not any(isinstance(h, _CurrentStderrHandler) for h in package_logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    commands = {"demo": run_demo, "fit": run_fit, "ndreamer": run_ndreamer}
    folder = None
    try:
        try:
            check_arguments(args)
            folder = OutputFolder(args.output, RESULT_NAMES)
            commands[args.command](args, folder)
        finally:
            # a run that failed before writing anything leaves no empty folder behind
            if folder is not None:
                folder.discard_if_empty()
            _leave_process_group()
    except KeyboardInterrupt:
        # Ctrl-C: the training loop has written a checkpoint (fit) before this point is reached
        hint = " Rerun the same command with --resume to continue from the last checkpoint." if args.command in ("fit", "ndreamer") else ""
        print(f"interrupted.{hint}", file=sys.stderr)
        return 130
    except NonFiniteError as err:
        print(f"error{_rank_prefix()}: {err}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError) as err:
        # KeyError's str() adds quotes around the message: print the message itself
        print(f"error{_rank_prefix()}: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
