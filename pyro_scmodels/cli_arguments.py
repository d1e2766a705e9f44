"""The command line's arguments: the parser of ``pyro-scmodels demo | fit | ndreamer`` and the checks of its
numeric options, made before any file is read or written. The commands themselves run in :mod:`pyro_scmodels.cli`."""

from __future__ import annotations

import argparse
import functools
import os
import re

from . import _validation as V
from .ndreamer._constants import MIN_CELLS_PER_GROUP, NEAREST_NEIGHBOR, NETWORK_PRESET_NAMES

# the smallest demo whose report has cells of every batch x type x condition (and NDreamer its groups of 10)
DEMO_MIN_CELLS, DEMO_MIN_GENES = 300, 50
# the numeric options of each command, checked before any file is read or written
_ARGUMENT_CHECKS = {
    "demo": {"n_cells": lambda name, value: V.integer(name, value, minimum=DEMO_MIN_CELLS, description=(
                 f"an integer >= {DEMO_MIN_CELLS} (its report needs cells of every batch, type and condition)")),
             "n_genes": lambda name, value: V.integer(name, value, minimum=DEMO_MIN_GENES, description=(
                 f"an integer >= {DEMO_MIN_GENES} (five cell types need their marker genes)")),
             "epochs": V.positive_int,
             "batch_size": V.positive_int, "lr": V.positive_float, "seed": V.seed},
    "fit": {"n_latent": V.positive_int, "n_hidden": V.positive_int, "n_layers": V.positive_int,
            "max_epochs": V.positive_int, "batch_size": V.positive_int, "lr": V.positive_float,
            "seed": V.seed, "devices": V.positive_int, "checkpoint_every": V.positive_int,
            "latent_independence": V.non_negative_float, "global_lr_factor": V.positive_float,
            "ambient_shape_prior": V.positive_float},
    "ndreamer": {"num_hvg": lambda name, value: V.integer(name, value, minimum=2, description=(
                     "an integer >= 2 (genes for the PCA of the cell states)")), "epochs": V.positive_float, "batch_size": V.positive_int,
                 "nearest_neighbor": V.positive_int, "bandwidth": V.positive_float, "seed": V.seed,
                 "ite_interval": V.level, "min_cells_per_group": V.positive_int},
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
    empty = getattr(args, "empty_droplets", None)
    if empty is not None and not os.path.isfile(empty):  # before the data are read (and before torchrun starts)
        raise FileNotFoundError(f"--empty-droplets: file {empty} not found.")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise ValueError("--resume continues the run in the output folder and --overwrite starts it anew: pass one of them.")
    if args.command == "fit" and args.backed and args.write_normalized:
        raise ValueError("--write-normalized writes a dense cells x genes layer, which --backed exists to avoid; drop one "
                         "of them (with a model from --backed, get_normalized_expression(indices=...) gives chosen cells).")
    if args.command == "fit" and args.backed and args.layer is not None:
        raise ValueError(f"--backed keeps only .X on disk; anndata loads --layer {args.layer!r} into memory. Put the raw "
                         "counts in .X of the file (adata.X = adata.layers[...]; adata.write_h5ad(...)) or drop --backed.")
    if args.command == "fit" and (args.devices or 1) > 1 and (args.latent_independence or 0) > 0:
        raise ValueError(f"--latent-independence {args.latent_independence} cannot be trained with --devices "
                         f"{args.devices}: its penalty compares cells across the whole minibatch, and each process would "
                         "see only its share. Train in one process, or drop --latent-independence.")
    if args.command == "ndreamer" and args.backed and args.layer is not None:
        raise ValueError(f"--backed keeps only .X on disk; anndata loads --layer {args.layer!r} into memory. Put the "
                         "expression in .X of the file or drop --backed.")
    if getattr(args, "ite_interval", None) is not None and args.nearest_neighbor < 2:
        raise ValueError(f"--ite-interval is estimated from the spread of the matched cells and needs at least two: "
                         f"got --nearest-neighbor {args.nearest_neighbor}; pass --nearest-neighbor 2 or more.")


DESCRIPTION = """Pyro models of single-cell counts from the command line.

  demo      simulate data with known truth, fit RegularizedVI and NDreamer, report what was recovered
  fit       fit RegularizedVI on your .h5ad of raw counts
  ndreamer  batch-denoised expression and per-cell treatment effects with NDreamer

Run `pyro-scmodels COMMAND --help` for a command's options."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, and keeps the description's line breaks.

    Flags (default False) and options without a default (None) show no "(default: ...)", nor does an
    option whose help already states its default ("(default ...", "default: ..." or "%(default)s");
    the word "default" elsewhere in a help (a choice named 'default') does not hide it.
    """

    _STATES_DEFAULT = ("(default", "default:", "%(default)")

    def _get_help_string(self, action):
        help_text = action.help or ""
        if (action.default is None or action.default is False
                or any(marker in help_text for marker in self._STATES_DEFAULT)):
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
    demo.add_argument("--batch-size", type=int, default=512, help="cells per RegularizedVI training step (NDreamer: 256)")
    demo.add_argument("--lr", type=float, default=2e-2, help="RegularizedVI's learning rate; higher than fit's: small data, few steps")
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
    keys.add_argument("--feature-scaling-keys", nargs="*", default=None,
                      help="per-gene multiplicative factor per category (default: the --nn-conditioning-keys; given "
                           "with no column, one factor shared by every cell)")
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
    net.add_argument("--ambient-per-droplet", action="store_true",
                     help="the ambient background as counts per droplet, mu = (l rho + s) y, not scaled by the library "
                          "(docs/ambient.md; best with --ambient-shape-prior)")
    net.add_argument("--decoder-gene-scale", action="store_true",
                     help="scale each gene's decoder output by its mean expression, so that fold changes inside a cell "
                          "type (a stimulation) are represented (docs/models.md, \"The decoder's scale\")")
    net.add_argument("--ambient-shape-prior", type=float, default=None, metavar="A",
                     help="count a Gamma(A, A / (m_e p_g)) prior on the background, centred on the pooled cells' profile "
                          "with an amount per ambient category that is learned (e.g. 3; default: off)")
    net.add_argument("--empty-droplets", default=None, metavar="H5AD",
                     help="an .h5ad of droplets without a cell (raw counts in .X, every gene of the data, and the ambient "
                          "key columns): each ambient category's background profile is measured there and only its "
                          "amount is learned (docs/ambient.md; best with --ambient-per-droplet and "
                          "--feature-scaling-keys; default: the profile is learned)")
    net.add_argument("--max-epochs", type=int, default=None,
                     help="training epochs; default min(round(400 * 20000 / n_cells), 400), as scvi-tools does")
    net.add_argument("--batch-size", type=int, default=1024, help="cells per step; 128 often integrates hard batches better")
    net.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam); raise to 1e-2 for small data")
    net.add_argument("--global-lr-factor", type=float, default=1.0,
                     help="the global sites (ambient, scaling, dispersion) learn at this multiple of --lr (10 integrates)")
    net.add_argument("--compile", action="store_true",
                     help="train through torch.compile: faster steps after 11-50 s of compiling (needs a C++ compiler)")
    fit.add_argument("--write-normalized", action="store_true",
                     help="also write the dense normalised-expression layer (float32: n_cells x n_genes x 4 bytes)")
    fit.add_argument("--backed", action="store_true",
                     help="train from disk: open the input with anndata's backed='r' (raw counts in .X, not --layer); "
                          "results.h5ad then holds the results, obs, var, obsm, varm, obsp, varp and uns, without "
                          "the counts, the layers and .raw, which stay in the input")
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
                         "densified; the chosen genes are held in memory as raw counts, or as a float32 CSR when the input is "
                         "log-normalised or the genes are chosen on every cell (docs/ndreamer.md, 'Data on disk')")
    nd.add_argument("--num-hvg", type=int, default=2000, help="variable genes used (all genes when fewer)")
    nd.add_argument("--min-cells-per-group", type=int, default=MIN_CELLS_PER_GROUP,
                    help="fewest cells a batch x condition group may hold (smaller groups are refused: every cell is "
                         "matched into each group)")
    nd.add_argument("--network", choices=list(NETWORK_PRESET_NAMES), default="default",
                    help="network size: 'default' is the SPEC's (tens of thousands of cells and more); 'small' trains "
                         "much faster and suits a few thousand cells, with the independence weight 1000 "
                         "(ndreamer.network_preset)")
    nd.add_argument("--epochs", type=float, default=None, help="passes over the data (default 15)")
    nd.add_argument("--batch-size", type=int, default=1024, help="cells per training step")
    nd.add_argument("--nearest-neighbor", type=int, default=NEAREST_NEIGHBOR,
                    help="matched cells per group, kernel-weighted (1: causal matching, one partner)")
    nd.add_argument("--bandwidth", type=float, default=1.0, help="kernel bandwidth for --nearest-neighbor > 1")
    nd.add_argument("--factual", choices=["auto", "observed", "matched"], default="auto",
                    help="a cell's own batch and condition in its ITE: its own counts, or the mean of its matched cells "
                         "there (less counting noise where the space keeps the cell state); auto: matched with "
                         "--network default, observed with --network small (docs/ndreamer.md)")
    nd.add_argument("--ite-interval", type=float, default=None, metavar="LEVEL",
                    help="also write layers ite_<condition>_qLO / _qHI, the bounds of each ITE's interval at this level "
                         "(e.g. 0.9: q05 and q95) from the spread of the matched cells")
    nd.add_argument("--shrink", choices=["clusters", "none"], default="clusters",
                    help="'clusters': empirical-Bayes shrinkage of each matching-space cluster's mean ITE "
                         "across genes (fewer false effects, slightly smaller real ones; the interval widened by the "
                         "cluster mean's posterior sd); obs column ite_shrinkage_cluster records the clusters "
                         "(docs/ndreamer.md, 'Shrunk effects'). 'none': the matched ITE unshrunk")
    nd.add_argument("--cate-groupby", default=None,
                    help="obs column (e.g. cell type): write cate_<condition>.csv and ite_heatmap_<condition>.png (one row per "
                         "group) for each treated condition")
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
    parser.command_parsers = sub.choices  # for parse_arguments: a command's own usage in its errors
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line parsed by :func:`build_parser`; an unknown option is refused with the command's usage.

    argparse alone refused an unknown option of ``fit`` (``--categorical-covariate-keys``) with the top-level usage;
    here the command's parser reports it, and an scvi-tools argument's option also says what to use instead.

    Parameters
    ----------
    argv
        The arguments after the program name.

    Returns
    -------
    argparse.Namespace

    Raises
    ------
    SystemExit
        Status 2 after argparse's message (usage and error) on stderr, as argparse does.
    """
    from .models.scvi_arguments import TABLES

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    notes = []
    for option in dict.fromkeys(u.split("=")[0] for u in unknown if u.startswith("--")):
        name = option[2:].replace("-", "_")
        said = next((table[name] for table in TABLES.values() if name in table), None)
        if said is not None:  # an scvi-tools argument (e.g. categorical_covariate_keys): what to use instead
            notes.append(f"{option} (scvi-tools' {name}): {in_option_names(said, args.command)}")
    parser.command_parsers[args.command].error(
        f"unrecognized arguments: {' '.join(unknown)}" + (". " + "; ".join(notes) if notes else ""))


#: the Python arguments that messages name, and the option that sets each on the command line
OPTION_OF = {
    "batch_key": "--batch-key", "ambient_covariate_keys": "--ambient-keys",
    "nn_conditioning_covariate_keys": "--nn-conditioning-keys", "feature_scaling_covariate_keys": "--feature-scaling-keys",
    "dispersion_key": "--dispersion-key", "library_size_key": "--library-size-key",
    "encoder_covariate_keys": "--encoder-keys", "continuous_covariate_keys": "--continuous-keys",
    "ambient_profile": "--empty-droplets", "ambient_shape_prior": "--ambient-shape-prior",
    "latent_independence": "--latent-independence", "ambient_per_droplet": "--ambient-per-droplet",
    "decoder_gene_scale": "--decoder-gene-scale",
    "n_latent": "--n-latent", "n_hidden": "--n-hidden", "n_layers": "--n-layers", "max_epochs": "--max-epochs",
    "batch_size": "--batch-size", "global_lr_factor": "--global-lr-factor", "checkpoint_every": "--checkpoint-every",
    "control_name": "--control", "condition_key": "--condition-key", "num_hvg": "--num-hvg",
    "nearest_neighbor": "--nearest-neighbor", "min_cells_per_group": "--min-cells-per-group",
}
#: names that are also plain words ("the layer"): changed only where a message gives them a value (``layer=``)
OPTION_OF_WITH_VALUE = {"layer": "--layer", "device": "--device", "lr": "--lr", "seed": "--seed", "factual": "--factual",
                        "bandwidth": "--bandwidth"}
# not after a dot: ``settings.n_latent`` names a part of a saved state, not an argument
_PYTHON_NAME = re.compile(r"(?<![.\w])(" + "|".join(sorted(map(re.escape, OPTION_OF), key=len, reverse=True)) + r")\b(=?)"
                          r"|(?<![.\w])(" + "|".join(map(re.escape, OPTION_OF_WITH_VALUE)) + r")=")
#: a call (``model.train(batch_size=64)``) or a path: Python the user would run or a file, left as it is
_CALL_OR_PATH = re.compile(r"\w\(|[/\\]")


def in_option_names(message: str, command: str | None = None) -> str:
    """A message of the package with its Python argument names as the command line's options.

    ``"pass encoder_covariate_keys=[...]"`` reads ``"pass --encoder-keys [...]"``, ``"device='cpu'"`` reads
    ``"--device 'cpu'"``: the package's messages name the Python arguments, which a command-line user does not have.
    Only the options of ``command`` are named; quoted text (a column, a gene, a value) and tokens that are paths or
    calls (holding ``/``, ``\\`` or a name followed by ``(``) are left as they are, and so are names after a dot
    (``settings.n_latent``, a part of a saved state).

    Parameters
    ----------
    message
        An error message.
    command
        The subcommand (``"fit"``, ``"ndreamer"``, ...); None: every command's options.

    Returns
    -------
    str
    """
    options = _command_options(command)

    def option(match: re.Match) -> str:
        if match.group(3):
            flag, equals = OPTION_OF_WITH_VALUE[match.group(3)], True
        else:
            flag, equals = OPTION_OF[match.group(1)], bool(match.group(2))
        if options is not None and flag not in options:
            return match.group(0)
        return flag + (" " if equals else "")

    def token(word: str) -> str:
        return word if _CALL_OR_PATH.search(word) else _PYTHON_NAME.sub(option, word)

    # quoted text is the user's (a column, a gene, a value): left alone; the rest a word at a time
    parts = re.split(r"('[^']*'|\"[^\"]*\")", message)
    out = "".join(part if i % 2 else re.sub(r"\S+", lambda m: token(m.group(0)), part) for i, part in enumerate(parts))
    out = out.replace(" to setup_anndata", "")
    # a switch takes no value: "--decoder-gene-scale True" reads "--decoder-gene-scale", "... False" "no --..."
    out = re.sub(r"(--[a-z-]+) (True|False)\b", _switch_value, out)
    return re.sub(r"(--[a-z-]+) `", r"\1`", out)  # "`layer=`" reads "`--layer`"


def _switch_value(match: re.Match) -> str:
    """``--flag True`` as the switch itself, ``--flag False`` as "no --flag"; an option with a value as it is."""
    flag, value = match.group(1), match.group(2)
    if flag not in _switches():
        return match.group(0)
    return flag if value == "True" else f"no {flag}"


@functools.lru_cache(maxsize=1)
def _switches() -> frozenset[str]:
    """The options of every subcommand that take no value (``store_true``)."""
    commands = next((a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)), None)
    return frozenset(flag for parser in (commands.choices.values() if commands else []) for action in parser._actions
                     if action.nargs == 0 and not isinstance(action, argparse._HelpAction) for flag in action.option_strings)


def _command_options(command: str | None) -> set[str] | None:
    """The options of a subcommand (None when not given or unknown)."""
    if command is None:
        return None
    commands = next((a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)), None)
    if commands is None or command not in commands.choices:
        return None
    return {flag for action in commands.choices[command]._actions for flag in action.option_strings}
