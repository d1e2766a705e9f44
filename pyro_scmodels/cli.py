"""Command line: ``pyro-scmodels demo``, ``pyro-scmodels fit`` and ``pyro-scmodels ndreamer``.

``demo`` simulates data with known truth (no download needed), fits RegularizedVI and NDreamer
and prints what they recovered; ``fit`` fits RegularizedVI and ``ndreamer`` runs NDreamer on a
user's h5ad file.

``fit`` trains data-parallel when started by ``torchrun`` (``torchrun --nproc_per_node=N -m
pyro_scmodels fit ...``) or with ``--devices N``, which starts ``torchrun`` itself on this machine.
Only rank 0 writes the output folder.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import numpy as np

from . import _validation as V
from ._atomic import atomic_path, write_h5ad
from ._io import InputFileError, OutputFolder, read_h5ad
from ._labels import names_as_text, stored_column_names
from .cli_arguments import in_option_names, check_arguments, parse_arguments
from .cli_launch import (launch_torchrun, leave_process_group, rank_prefix, read_for_the_launch_check,
                         stop_signals_as_interrupt)
from .cli_output import RESULT_NAMES, discard_earlier_outputs, prepare_output, remove_superseded
from .distributed import launched_world_size
from .elbo import CompileUnavailableError
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


def _check_device(device: str) -> None:
    """The torch device is checked before any folder is made or file read (``--device cuda`` without a GPU)."""
    from .infer import resolve_device

    resolve_device(device)


def _store_results(model, adata, write_normalized: bool = True) -> None:
    adata.obsm[LATENT_KEY] = model.get_latent_representation()
    if write_normalized:
        adata.layers[NORMALIZED_LAYER] = model.get_normalized_expression(return_numpy=True).astype(np.float32)
    elif NORMALIZED_LAYER in adata.layers:  # an earlier run's (its input was an earlier results.h5ad): not this model's
        del adata.layers[NORMALIZED_LAYER]
        logging.getLogger("pyro_scmodels").warning(f"The input's layers['{NORMALIZED_LAYER}'] came from an earlier "
                                                   "model and is left out of the results; pass --write-normalized "
                                                   "for this model's.")
    # DataFrames keep the category names as columns (a "/" escaped, as the file needs)
    adata.varm["regularizedvi_ambient"] = stored_column_names(model.get_ambient_profile())
    adata.varm["regularizedvi_dispersion"] = stored_column_names(model.get_dispersion())
    adata.varm["regularizedvi_feature_scaling"] = stored_column_names(model.get_feature_scaling())
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
    out = prepare_output(folder, args)
    discard_earlier_outputs(out, args)  # the demo's arguments are checked by now; it simulates its own input
    return demo.run(args, out, LATENT_KEY, lambda model, adata: _store_results(model, adata, args.write_normalized),
                    lambda model, adata, folder, colour_by: write_figures(model, adata, folder, colour_by, args.umap))


def _check_cate_groups(nd, obs, groupby: str) -> None:
    """``--cate-groupby``: raise unless each treatment has a group with enough cells of it and of the control."""
    import warnings

    from .ndreamer.effect_queries import labels_of
    from .ndreamer import _constants as K
    from .ndreamer.cate import groups_with_both_conditions

    V.group_column(obs, groupby, "--cate-groupby")
    groups = labels_of(obs, [groupby], "--cate-groupby")[:, 0]
    for treatment in nd.design.treatments:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the groups left out are reported when the CATE is computed
            try:
                groups_with_both_conditions(groups, nd.design.condition, treatment, nd.design.control_name,
                                            K.MIN_CELLS_FOR_CATE)
            except ValueError as err:
                raise ValueError(f"--cate-groupby {groupby}: {err} Choose a column of cell groups (e.g. cell types).") from err


def run_ndreamer(args, folder: OutputFolder) -> None:
    """NDreamer on a user's h5ad: modifier space, denoised expression, per-cell effects, CATE."""
    from .figures import plot_ite_heatmap
    from .ndreamer import NDreamer
    from .ndreamer.effect_intervals import bound_names
    from .ndreamer import network_preset
    from .ndreamer.pipeline import ONE_PROCESS_ONLY
    from .ndreamer.effect_queries import refuse_slash_in_groupby

    _check_device(args.device)
    if launched_world_size() > 1:
        raise ValueError(ONE_PROCESS_ONLY)
    args.shrink = None if args.shrink == "none" else args.shrink  # the methods' value for no shrinkage
    out = prepare_output(folder, args)
    # backed: .X stays on disk and is read in blocks of rows (layers are loaded by anndata)
    adata = read_h5ad(args.data, backed="r" if args.backed else None)
    if args.cate_groupby is not None:
        V.present(args.cate_groupby, adata.obs.columns, f"{args.data} obs (--cate-groupby)", "column")
        refuse_slash_in_groupby(args.cate_groupby, "--cate-groupby")
    # the constructor checks keys, the control, and the batch x condition group sizes before training
    nd = NDreamer(adata, args.condition_key, args.control, batch_key=args.batch_key, num_hvg=args.num_hvg,
                  min_cells_per_group=args.min_cells_per_group,
                  layer=args.layer, batch_size=args.batch_size, device=args.device, seed=args.seed,
                  factual=args.factual, **network_preset(args.network))
    if args.cate_groupby is not None:  # every treatment needs a group with both arms: checked before training
        _check_cate_groups(nd, adata.obs, args.cate_groupby)
    discard_earlier_outputs(out, args)
    nd.train(n_epochs=args.epochs, progress_bar=not args.quiet, checkpoint_dir=os.path.join(out, "checkpoint"))
    nd.get_modifier_space()
    layers = f"denoised, batch_effect, {', '.join('ite_' + c for c in nd.design.treatments)}"
    if args.ite_interval is not None:
        layers += ", " + ", ".join(f"ite_{c}_{b}" for c in nd.design.treatments for b in bound_names(args.ite_interval))
    if args.backed:
        # no cells x genes array of the whole data: the layers are computed and written a block of cells at a time
        nd.save(out, overwrite=True)
        nd.write_effects(os.path.join(out, "effects.h5ad"), args.nearest_neighbor, args.bandwidth, overwrite=True,
                         interval=args.ite_interval, shrink=args.shrink)
        wrote = (f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['X_effect_modifier_space']), "
                 f"{os.path.join(out, 'effects.h5ad')} (layers {layers}), the network")
    else:
        # the effects with an interval first: the batch decomposition is then read from the same cached result
        nd.estimate_ite(args.nearest_neighbor, args.bandwidth, interval=args.ite_interval, shrink=args.shrink)
        nd.decompose_batch_effect(args.nearest_neighbor, args.bandwidth)
        # the results are saved before CATE, so that a CATE problem loses nothing
        nd.save(out, overwrite=True)
        wrote = f"Wrote {os.path.join(out, 'results.h5ad')} (obsm['X_effect_modifier_space'], layers {layers}), the network"
    if args.resume:  # the earlier run's tables and files would not belong to this run's results: before any is written
        remove_superseded(out, {os.path.join(out, "effects.h5ad")} if args.backed else set())
    written = []
    for condition in (nd.design.treatments if args.cate_groupby else []):
        table = nd.estimate_cate(args.cate_groupby, condition, nearest_neighbor=args.nearest_neighbor,
                                 bandwidth=args.bandwidth, shrink=args.shrink)
        with atomic_path(os.path.join(out, f"cate_{condition}.csv")) as temporary:
            table.to_csv(temporary, index=False)
        written.append(os.path.join(out, f"cate_{condition}.csv"))
        # the heatmap shows each group's mean ITE: the CATE table's, one row per group
        means = table.pivot(index="group", columns="gene", values="mean_ite").reindex(columns=list(nd.genes))
        written.append(plot_ite_heatmap(means.to_numpy(), nd.genes, means.index,
                                        os.path.join(out, f"ite_heatmap_{condition}.png"), condition=condition))
    print(wrote + (f", {', '.join(written)}." if written else "."))


def _set_up(adata, args) -> None:
    """``setup_anndata`` of ``fit``'s options on ``adata`` (which it validates), and the figure's label column."""
    from . import RegularizedVI

    RegularizedVI.setup_anndata(
        adata, layer=args.layer, batch_key=args.batch_key, ambient_covariate_keys=args.ambient_keys,
        nn_conditioning_covariate_keys=args.nn_conditioning_keys, feature_scaling_covariate_keys=args.feature_scaling_keys,
        dispersion_key=args.dispersion_key, library_size_key=args.library_size_key,
        encoder_covariate_keys=args.encoder_keys, continuous_covariate_keys=args.continuous_keys,
    )
    if args.label_key is not None:  # only colours a figure, but a misspelt column must not pass unnoticed
        V.present(args.label_key, adata.obs.columns, f"{args.data} obs (--label-key)", "column")


def _check_before_launch(args) -> None:
    """``fit --devices N``: the device, and the setup on every cell of the file, checked once before the processes
    start (a refusal inside them came with torchrun's traceback and exit code 1)."""
    _check_device(args.device)
    # read backed whatever --backed says: the counts are checked chunk by chunk, as a --backed process checks them
    # (the file's first 1,000 cells only, as before, let a bad count further on reach the processes)
    adata = read_for_the_launch_check(args.data, args.backed, args.layer)
    try:
        _set_up(adata, args)
        if args.empty_droplets is not None:  # read, and checked against the data's genes and ambient categories
            _profile_from_empty_droplets(args.empty_droplets, adata)
    finally:
        adata.file.close()


def run_fit(args, folder: OutputFolder) -> None:
    """Fit RegularizedVI on a user's h5ad and write results and the model (rank 0 only, when data-parallel)."""
    from . import RegularizedVI
    from .distributed import is_writer

    _check_device(args.device)
    writer = is_writer()
    # the other ranks of a torchrun launch read the same input, train, and leave the folder to rank 0
    out = prepare_output(folder, args) if writer else folder.path
    # backed: .X stays on disk and training reads it in shuffled chunks of cells (layers are loaded by anndata)
    adata = read_h5ad(args.data, backed="r" if args.backed else None)
    # everything is validated here, before training starts
    _set_up(adata, args)
    profile = None if args.empty_droplets is None else _profile_from_empty_droplets(args.empty_droplets, adata)
    model = RegularizedVI(adata, n_hidden=args.n_hidden, n_latent=args.n_latent, n_layers=args.n_layers, seed=args.seed,
                          latent_independence=args.latent_independence, ambient_per_droplet=args.ambient_per_droplet,
                          decoder_gene_scale=args.decoder_gene_scale,
                          ambient_shape_prior=args.ambient_shape_prior, ambient_profile=profile)
    if writer:
        discard_earlier_outputs(out, args)
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                global_lr_factor=args.global_lr_factor, checkpoint_dir=os.path.join(out, "checkpoint"), checkpoint_every=args.checkpoint_every,
                progress_bar=not args.quiet, devices=args.devices, compile=args.compile)
    if not writer:
        return
    if args.backed:  # the results without the counts, which stay in the input file
        import anndata

        # the cell and gene graphs too (a neighbours graph); the layers and .raw, cells x genes, stay in the input
        adata = anndata.AnnData(obs=adata.obs.copy(), var=adata.var.copy(), obsm=dict(adata.obsm),
                                varm=dict(adata.varm), obsp=dict(adata.obsp), varp=dict(adata.varp), uns=dict(adata.uns))
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


def _profile_from_empty_droplets(path: str, adata):
    """``fit --empty-droplets``: each ambient category's profile, from the empty droplets in ``path``."""
    from .data.registry import read_setup
    from .models.ambient import check_droplets, profile_from_droplets

    try:
        empty = read_h5ad(path)
    except InputFileError as err:
        raise InputFileError(f"--empty-droplets: {err}") from err
    setup = read_setup(adata)
    keys = list(setup.keys.ambient)
    try:
        check_droplets(empty, adata.var_names, {key: list(setup.categories[key]) for key in keys})
        # the data's genes by position, their names matched as text (as check_droplets matched them)
        genes = names_as_text(empty.var_names).get_indexer(names_as_text(adata.var_names))
        return profile_from_droplets(empty[:, genes], groupby=keys or None)
    except (KeyError, ValueError) as err:  # the same error, naming the option and the file
        # the droplets are read from .X: --layer (which the count check's hint names) picks the data's layer only
        message = str(err.args[0]).replace("pass the raw count layer with `layer=`.",
                                           "write the droplets' raw counts in .X of that file (--layer is the data's).")
        raise type(err)(f"--empty-droplets {path}: {message}") from err


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a command's user reads it: its text, without a file and line of code (a package warning names
    the first frame outside the package, which for a command is runpy's or the console script's)."""
    kind = "warning" if category is UserWarning else category.__name__
    print(f"{kind}{rank_prefix()}: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    """Entry point of the ``pyro-scmodels`` console script."""
    with warnings.catch_warnings():  # the caller's own warning display is back after the command
        warnings.showwarning = _show_warning
        return _run(argv)


def _run(argv) -> int:
    """:func:`main`'s command, run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    launch = bool(getattr(args, "devices", None) and args.devices > 1 and "WORLD_SIZE" not in os.environ)
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
            folder = OutputFolder(args.output, RESULT_NAMES, resumable=args.command != "demo")
            if launch:
                # the input file and the output folder are checked here, once, before the processes start: a
                # refusal inside them came with torchrun's own report (a traceback) and exit code 1
                _check_before_launch(args)
                prepare_output(folder, args)
                return launch_torchrun(argv, args.devices)
            with stop_signals_as_interrupt():  # a scheduler's SIGTERM writes the checkpoint, as Ctrl-C does
                commands[args.command](args, folder)
        finally:
            # a run that failed before writing anything leaves no empty folder behind
            if folder is not None:
                folder.discard_if_empty()
            leave_process_group()
    except KeyboardInterrupt:
        # Ctrl-C: the training loop has written a checkpoint (fit) before this point is reached
        again = "the same command without --overwrite and with --resume" if getattr(args, "overwrite", False) else \
            "the same command with --resume"
        hint = f" Rerun {again} to continue from the last checkpoint." if args.command in ("fit", "ndreamer") else ""
        print(f"interrupted.{hint}", file=sys.stderr)
        return 130
    except NonFiniteError as err:
        print(f"error{rank_prefix()}: {err}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError, CompileUnavailableError) as err:
        # KeyError's str() adds quotes around the message: print the message itself
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        print(f"error{rank_prefix()}: {in_option_names(message, args.command)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
