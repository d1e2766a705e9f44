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
import time

import numpy as np

from . import _validation as V
from ._atomic import atomic_path, write_h5ad
from ._io import OutputFolder, read_h5ad
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
            "seed": V.non_negative_int, "devices": V.positive_int, "checkpoint_every": V.positive_int},
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


def run_demo(args, folder: OutputFolder) -> dict:
    """Simulate, fit, compare with the truth, write ``results.h5ad`` and the model."""
    from . import RegularizedVI, datasets
    from . import metrics as M

    _check_device(args.device)
    out = _prepare_output(folder, args)
    print(f"Simulating {args.n_cells} cells x {args.n_genes} genes (5 cell types, 3 batches, seed {args.seed}) ...")
    # markers and responding genes scale down with small gene numbers (5 types need 5 marker sets)
    n_markers = min(20, max(1, args.n_genes // 10))
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_markers_per_type=n_markers,
                              n_responding_genes=min(40, max(1, args.n_genes // 10)), seed=args.seed)
    RegularizedVI.setup_anndata(
        adata, layer="counts", ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"],
        library_size_key="batch",
    )
    model = RegularizedVI(adata, seed=args.seed)
    start = time.time()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, kl_warmup_epochs=args.epochs // 10,
                early_stopping=False, device=args.device, seed=args.seed, progress_bar=not args.quiet)
    seconds = time.time() - start
    _store_results(model, adata)
    true_ambient = adata.varm["true_ambient"]
    fitted = adata.varm["regularizedvi_ambient"].to_numpy()
    ambient_r = [M.pearson(np.log(fitted[:, b]), np.log(true_ambient[:, b])) for b in range(true_ambient.shape[1])]
    pca = M.log_normalised_pca(adata.layers["counts"])
    z = adata.obsm[LATENT_KEY]
    report = {
        "training seconds": seconds,
        "final train loss": float(model.history["train_loss"].iloc[-1]),
        "ambient profile vs truth, Pearson of logs (per batch)": ambient_r,
        "dispersion vs truth, Spearman": M.spearman(adata.varm["regularizedvi_dispersion"].iloc[:, 0], adata.var["true_theta"]),
        "cell-type ARI of k-means on the latent": M.cluster_ari(z, adata.obs["cell_type"]),
        "cell-type ARI of k-means on PCA (baseline)": M.cluster_ari(pca, adata.obs["cell_type"]),
        "batch mixing (kNN batch entropy, 1 = mixed), latent": M.knn_entropy(z, adata.obs["batch"]),
        "batch mixing, PCA of log-normalised counts (baseline)": M.knn_entropy(pca, adata.obs["batch"]),
    }
    print("\nRecovered vs ground truth")
    for name, value in report.items():
        shown = ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else f"{value:.3f}"
        print(f"  {name:<58} {shown}")
    write_h5ad(adata, os.path.join(out, "results.h5ad"))
    model.save(os.path.join(out, "model"), overwrite=True)
    print(f"\nWrote {os.path.join(out, 'results.h5ad')} (obsm['{LATENT_KEY}'], layers['{NORMALIZED_LAYER}']) and {os.path.join(out, 'model')}/")
    if not args.skip_ndreamer:
        report.update(_demo_ndreamer(adata, out, args))
    return report


def _demo_ndreamer(adata, out: str, args) -> dict:
    """NDreamer on the simulated stimulation: per-cell effects against the known truth."""
    from . import metrics as M
    from .ndreamer import NDreamer
    from .ndreamer._constants import NETWORK_PRESETS

    print("\nNDreamer: effect-modifier space and per-cell effects of 'stimulated' vs 'control' ...")
    # a compact network (the SPEC defaults are sized for tens of thousands of cells)
    nd = NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", **NETWORK_PRESETS["small"],
                  batch_size=256, device=args.device, seed=args.seed)
    nd.train(progress_bar=not args.quiet)
    nd.get_modifier_space()
    nd.decompose_batch_effect(nearest_neighbor=10)
    results = nd.estimate_ite(nearest_neighbor=10)
    truth = adata[:, nd.genes]
    genes = truth.var["responding"].to_numpy()
    ite = results.layers["ite_stimulated"]
    quiet = ~adata.obs["cell_type"].isin(adata.uns["simulation"]["responding_cell_types"]).to_numpy()
    report = {
        "NDreamer ITE vs truth, Pearson over responding genes": M.pearson(ite[:, genes], truth.layers["true_ite"][:, genes]),
        "NDreamer mean |ITE| of responding genes, responding types": float(np.abs(ite[~quiet][:, genes].mean(0)).mean()),
        "NDreamer mean |ITE| of responding genes, other types (truth 0)": float(np.abs(ite[quiet][:, genes].mean(0)).mean()),
        "NDreamer condition mixing in the modifier space (1 = mixed)": M.knn_entropy(
            results.obsm["X_effect_modifier_space_PCA"], adata.obs["condition"]),
    }
    for name, value in report.items():
        print(f"  {name:<68} {value:.3f}")
    nd.save(os.path.join(out, "ndreamer"), overwrite=True)
    print(f"Wrote {os.path.join(out, 'ndreamer')}/ (results.h5ad with layers denoised, batch_effect, ite_stimulated)")
    return report


def run_ndreamer(args, folder: OutputFolder) -> None:
    """NDreamer on a user's h5ad: modifier space, denoised expression, per-cell effects, CATE."""
    from .ndreamer import NDreamer
    from .ndreamer._constants import NETWORK_PRESETS

    _check_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("ndreamer trains in one process (its losses compare cells across the whole minibatch); "
                         "run it without torchrun.")
    out = _prepare_output(folder, args)
    adata = read_h5ad(args.data)
    if args.cate_groupby is not None:
        V.present(args.cate_groupby, adata.obs.columns, f"{args.data} obs (--cate-groupby)", "column")
    # the constructor checks keys, the control, and the batch x condition group sizes before training
    nd = NDreamer(adata, args.condition_key, args.control, batch_key=args.batch_key, num_hvg=args.num_hvg,
                  layer=args.layer, batch_size=args.batch_size, device=args.device, seed=args.seed,
                  **NETWORK_PRESETS[args.network])
    nd.train(n_epochs=args.epochs, progress_bar=not args.quiet, checkpoint_dir=os.path.join(out, "checkpoint"))
    nd.get_modifier_space()
    nd.decompose_batch_effect(args.nearest_neighbor, args.bandwidth)
    nd.estimate_ite(args.nearest_neighbor, args.bandwidth)
    # the results are saved before CATE, so that a CATE problem loses nothing
    nd.save(out, overwrite=True)
    for condition in (nd.design.treatments if args.cate_groupby else []):
        table = nd.estimate_cate(args.cate_groupby, condition)
        with atomic_path(os.path.join(out, f"cate_{condition}.csv")) as temporary:
            table.to_csv(temporary, index=False)
    print(f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['X_effect_modifier_space'], layers denoised, "
          f"batch_effect, {', '.join('ite_' + c for c in nd.design.treatments)}) and the network.")


def run_fit(args, folder: OutputFolder) -> None:
    """Fit RegularizedVI on a user's h5ad and write results and the model (rank 0 only, when data-parallel)."""
    from . import RegularizedVI
    from .distributed import is_writer

    _check_device(args.device)
    writer = is_writer()
    # the other ranks of a torchrun launch read the same input, train, and leave the folder to rank 0
    out = _prepare_output(folder, args) if writer else folder.path
    adata = read_h5ad(args.data)
    # everything is validated here, before training starts
    RegularizedVI.setup_anndata(
        adata, layer=args.layer, batch_key=args.batch_key, ambient_covariate_keys=args.ambient_keys,
        nn_conditioning_covariate_keys=args.nn_conditioning_keys, feature_scaling_covariate_keys=args.feature_scaling_keys,
        dispersion_key=args.dispersion_key, library_size_key=args.library_size_key,
        encoder_covariate_keys=args.encoder_keys, continuous_covariate_keys=args.continuous_keys,
    )
    model = RegularizedVI(adata, n_hidden=args.n_hidden, n_latent=args.n_latent, n_layers=args.n_layers, seed=args.seed)
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                checkpoint_dir=os.path.join(out, "checkpoint"), checkpoint_every=args.checkpoint_every,
                progress_bar=not args.quiet, devices=args.devices)
    if not writer:
        return
    _store_results(model, adata, write_normalized=not args.skip_normalized)
    write_h5ad(adata, os.path.join(out, "results.h5ad"))
    model.save(os.path.join(out, "model"), overwrite=True)
    with atomic_path(os.path.join(out, "history.csv")) as temporary:
        model.history.to_csv(temporary)
    print(f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['{LATENT_KEY}']) and {os.path.join(out, 'model')}/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-scmodels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulate data with known truth, fit RegularizedVI, report recovery")
    demo.add_argument("-o", "--output", default="pyro_scmodels_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--n-cells", type=int, default=3000)
    demo.add_argument("--n-genes", type=int, default=500)
    demo.add_argument("--epochs", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=512)
    demo.add_argument("--lr", type=float, default=1e-2, help="higher than the 1e-3 default: small data, few steps")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--skip-ndreamer", action="store_true", help="only RegularizedVI")

    fit = sub.add_parser("fit", help="fit RegularizedVI on an h5ad file of raw counts")
    fit.add_argument("data", help="input .h5ad (raw counts in .X or --layer)")
    fit.add_argument("-o", "--output", required=True, help="output folder")
    fit.add_argument("--layer", default=None)
    fit.add_argument("--batch-key", default=None, help="shortcut for ambient, dispersion and library keys")
    fit.add_argument("--ambient-keys", nargs="+", default=None)
    fit.add_argument("--nn-conditioning-keys", nargs="+", default=None)
    fit.add_argument("--feature-scaling-keys", nargs="+", default=None)
    fit.add_argument("--dispersion-key", default=None)
    fit.add_argument("--library-size-key", default=None)
    fit.add_argument("--encoder-keys", nargs="+", default=None)
    fit.add_argument("--continuous-keys", nargs="+", default=None)
    fit.add_argument("--n-latent", type=int, default=10)
    fit.add_argument("--n-hidden", type=int, default=128)
    fit.add_argument("--n-layers", type=int, default=1)
    fit.add_argument("--max-epochs", type=int, default=None)
    fit.add_argument("--batch-size", type=int, default=1024)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--device", default="auto")
    fit.add_argument("--devices", type=int, default=None,
                     help="data-parallel training on N processes of this machine (starts torchrun; under torchrun: "
                          "its --nproc_per_node). Multi-node: see docs/distributed.md")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--skip-normalized", action="store_true", help="do not write the dense normalised-expression layer")
    fit.add_argument("--overwrite", action="store_true", help="replace earlier results in the output folder")
    fit.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT/checkpoint")
    fit.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints (default: %(default)s)")
    fit.add_argument("--quiet", action="store_true")
    nd = sub.add_parser("ndreamer", help="NDreamer: batch-denoised expression and per-cell treatment effects")
    nd.add_argument("data", help="input .h5ad (raw counts or log-normalised)")
    nd.add_argument("-o", "--output", required=True, help="output folder")
    nd.add_argument("--condition-key", required=True)
    nd.add_argument("--control", required=True, help="name of the control condition")
    nd.add_argument("--batch-key", nargs="+", default=None, help="one or more batch columns")
    nd.add_argument("--layer", default=None)
    nd.add_argument("--num-hvg", type=int, default=2000)
    nd.add_argument("--network", choices=["small", "default"], default="default",
                    help="network size: 'default' is the SPEC's (tens of thousands of cells and more); 'small' trains "
                         "much faster and suits a few thousand cells")
    nd.add_argument("--epochs", type=float, default=None, help="passes over the data (default 15)")
    nd.add_argument("--batch-size", type=int, default=1024)
    nd.add_argument("--nearest-neighbor", type=int, default=1)
    nd.add_argument("--bandwidth", type=float, default=1.0)
    nd.add_argument("--cate-groupby", default=None, help="obs column: write cate_<condition>.csv per group")
    nd.add_argument("--device", default="auto")
    nd.add_argument("--seed", type=int, default=0)
    nd.add_argument("--overwrite", action="store_true")
    nd.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT/checkpoint")
    nd.add_argument("--quiet", action="store_true")
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
    package_logger.setLevel(logging.INFO)
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
