"""The command line's help and messages: ``--help`` shows every option's default and the version, and errors name
the command's options, not the Python arguments."""

from __future__ import annotations

import argparse

import pytest

import pyro_scmodels as ps
from pyro_scmodels.cli import main

from . import _cli
from ._cli import help_entries

# the shared fixtures of tests/_cli.py, bound here for pytest to find
_restore_package_logger = _cli._restore_package_logger


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024)" in text and "--write-normalized" in text and "``" not in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pyro-scmodels {ps.__version__}"


def test_help_of_every_command_shows_every_option_default(capsys):
    """README: `pyro-scmodels COMMAND --help` lists every option with its default, also where the help text holds the
    word "default" otherwise (ndreamer --network's choice 'default', --factual's "--network default")."""
    import argparse

    from pyro_scmodels.cli_arguments import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = []
    for name, parser in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        entries = help_entries(capsys.readouterr().out)
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            entry = entries[action.option_strings[0]]
            assert f"(default: {action.default})" in entry, f"{name} {action.option_strings[-1]}: {entry}"
            checked.append((name, action.option_strings[-1]))
    assert {("ndreamer", "--network"), ("ndreamer", "--factual"), ("fit", "--lr")} <= set(checked)


def test_errors_name_the_options_not_the_python_arguments():
    # a command-line user was told to pass encoder_covariate_keys=[...] to setup_anndata, or to lower
    # min_cells_per_group, which the command did not offer
    from pyro_scmodels.cli_arguments import in_option_names

    assert in_option_names("pass encoder_covariate_keys=[...] (e.g. the condition) to setup_anndata, or leave "
                           "latent_independence at 0.") == ("pass --encoder-keys [...] (e.g. the condition), or leave "
                                                            "--latent-independence at 0.")
    assert in_option_names("or lower min_cells_per_group if you accept that") == \
        "or lower --min-cells-per-group if you accept that"
    assert in_option_names("use device='cpu' or 'auto'") == "use --device 'cpu' or 'auto'"
    assert in_option_names("pass the raw count layer with `layer=`; the layer that holds counts") == \
        "pass the raw count layer with `--layer`; the layer that holds counts"  # a plain word stays
    # the user's own text stays: a path, a quoted column or gene, a call; and only the command's own options
    for untouched, command in (("input file sweep/lr=0.01/cells.h5ad not found.", "fit"),
                               ("Column 'batch_key' not found in adata.obs", "fit"),
                               ("model.train(batch_size=256) first", "fit"), ("set n_latent=3", "ndreamer")):
        assert in_option_names(untouched, command) == untouched
    assert in_option_names("control_name 'ctrl' is not a condition", "ndreamer") == "--control 'ctrl' is not a condition"
    # a bracket opening a remark is not a call, and a name after a dot is a part of a saved state
    assert in_option_names("set it (n_latent or batch_size=64)", "fit") == "set it (--n-latent or --batch-size 64)"
    assert in_option_names("written for other settings (settings.n_latent differ)", "fit") == \
        "written for other settings (settings.n_latent differ)"
    # a switch takes no value: the settings that resume a checkpoint name it as it is typed
    assert in_option_names("written with: decoder_gene_scale=True (now the default), n_hidden=64 (now 32)", "fit") == \
        "written with: --decoder-gene-scale (now the default), --n-hidden 64 (now 32)"
    assert in_option_names("ambient_per_droplet=False, latent_independence=True", "fit") == \
        "no --ambient-per-droplet, --latent-independence True"
    from pyro_scmodels.cli_arguments import OPTION_OF, OPTION_OF_WITH_VALUE, build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {option for command in ("fit", "ndreamer") for action in commands[command]._actions
               for option in action.option_strings}

    assert set(OPTION_OF.values()) | set(OPTION_OF_WITH_VALUE.values()) <= options  # every option named exists
