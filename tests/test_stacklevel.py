"""user_stacklevel: a package warning points at the first frame outside the package, however deep the call went."""

import importlib.util
import inspect
import warnings

import numpy as np
import pyro.distributions as dist

import pyro_scmodels as ps
from pyro_scmodels._stacklevel import PACKAGE_DIR, user_stacklevel
from pyro_scmodels.criticism import posterior_predictive_check, prior_predictive_check
from pyro_scmodels.ndreamer import NDreamer

from . import _ndreamer_tiny
from ._ndreamer_tiny import TINY, save_with_one_arm_batches, tiny_nd
from .test_direct_elbo import QUICK, SMALL, EditedPriorClaimingDirect, small_adata
from .test_multimodal_unmeasured import batch_without_atac

# the shared fixture of tests/_ndreamer_tiny.py, bound here for pytest to find
tiny_adata = _ndreamer_tiny.tiny_adata

# functions whose frames count as the package's: compiled under a file name inside its directory
_PACKAGE_SOURCE = '''
import contextlib
import warnings

import torch
from pyro_scmodels._stacklevel import user_stacklevel

def warn(message):
    warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

def deeper(message, depth):
    return warn(message) if depth == 0 else deeper(message, depth - 1)

def level():
    return user_stacklevel()

def through(callback):
    return callback()

@torch.no_grad()
def decorated(message):
    return deeper(message, 1)

@contextlib.contextmanager
def context():
    yield

@context()
def in_context(message):
    return warn(message)

class Warns(torch.nn.Module):
    def forward(self, message):
        return deeper(message, 1)
'''
_package = {}
exec(compile(_PACKAGE_SOURCE, PACKAGE_DIR + "_stacklevel_test_module.py", "exec"), _package)


def test_a_package_warning_names_the_line_that_called_into_the_package_at_any_depth():
    for depth in (0, 1, 3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            _package["deeper"](f"{depth} frames deeper", depth)
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)], depth


def test_the_level_counts_the_package_frames_above_the_caller():
    assert user_stacklevel() == 1  # called outside the package: the warning points at its own line
    assert _package["level"]() == 2  # the package function, then this test
    assert _package["through"](_package["level"]) == 3
    assert _package["through"](lambda: user_stacklevel()) == 1  # a callback of the user's is the user's own frame


def test_a_warning_of_the_users_callback_called_by_the_package_names_the_callback():
    def callback():
        warnings.warn("from the user's callback", UserWarning, stacklevel=user_stacklevel())
        return inspect.currentframe().f_lineno - 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _package["through"](callback)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_a_decorated_package_function_warns_at_the_users_line():
    """``@torch.no_grad()`` (and a context manager used as a decorator) put a wrapper's frame between the user and the
    package: the warning named torch's _contextlib.py. So does ``torch.nn.Module.__call__`` before a package module's
    ``forward``: it named torch's module.py."""
    for call in (_package["decorated"], _package["in_context"], _package["Warns"]()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            call("through a wrapper")
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)], call


def _files_of(call, text: str) -> set:
    """``{__file__}`` when every warning holding ``text`` that ``call()`` gives names the user's line: a line of
    ``call`` itself when it is a lambda of this file, else the line below that calls it; otherwise the (file, line) of
    each (so a warning pointing a frame too far, at this function or the test, fails too)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        call()
    code = getattr(call, "__code__", None)
    if code is not None and code.co_filename == __file__:
        expected = {number for _, _, number in code.co_lines() if number is not None}
    else:
        expected = {line}
    found = {(w.filename, w.lineno) for w in caught if text in str(w.message)}
    if found and all(name == __file__ and number in expected for name, number in found):
        return {__file__}
    return found


def test_query_warnings_name_the_users_line():
    """A query of a model or NDreamer (untrained, then trained) warns at the user's line, whichever public method was
    called (a fixed stacklevel named posterior_queries.py, ambient.py, effect_queries.py or torch's _contextlib.py)."""
    adata = ps.datasets.simulate(n_cells=200, n_genes=60, n_markers_per_type=4, n_responding_genes=6, seed=5)
    nd = tiny_nd(adata)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_hidden=16, n_latent=4)
    for call in (model.get_latent_representation, model.get_normalized_expression, model.get_ambient_fraction,
                 model.get_library_size, model.check_trained, lambda: model.posterior_predictive(num_samples=1)):
        assert _files_of(call, "has not been trained") == {__file__}, call
    for call in (nd.estimate_ite, nd.get_modifier_space):  # through the effects' first embedding, and directly
        assert _files_of(call, "has not been trained") == {__file__}, call
    # the warnings of a trained model's and NDreamer's queries (their fixed levels named regularizedvi.py,
    # posterior_queries.py and effect_queries.py)
    model.train(max_epochs=1, progress_bar=False)
    nd._set_embedding(adata.obsm["true_latent"])
    for call, text in ((lambda: model.get_normalized_expression(n_samples=2, return_mean=False, return_numpy=False),
                        "return_mean=False"),
                       (lambda: model.get_normalized_expression(transform_batch="batch_0"), "changes nothing"),
                       (lambda: nd.estimate_ite(nearest_neighbor=1000), "more than the cells"),
                       (lambda: nd.decompose_batch_effect(nearest_neighbor=900, indices=[0, 1]), "more than the cells")):
        assert _files_of(call, text) == {__file__}, text


# --- the package's warnings through public entry points (most fixed levels named a package file or torch) ---
def test_training_warnings_name_the_users_line():
    """A second train() with another train_size (_base.py), and a model class that claims the direct ELBO wrongly (the
    warning is raised inside ELBOLoss.forward: its fixed level named torch's module.py)."""
    model = ps.RegularizedVI(small_adata(batch_key="batch"), **SMALL)
    model.module.model.__class__ = EditedPriorClaimingDirect
    assert _files_of(lambda: model.train(max_epochs=1, **QUICK), "Trace_ELBO gives") == {__file__}
    assert _files_of(lambda: model.train(max_epochs=2, train_size=0.5, **QUICK), "train_size differs") == {__file__}


def test_resume_warnings_name_the_users_line(tmp_path):
    """A checkpoint resumed with another seed and train_size: its seed (training.py: its fixed level named _base.py)
    and its split (infer.py: named checkpoints.py) are kept."""
    adata = small_adata()
    ps.RegularizedVI(adata, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path), seed=0, **QUICK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps.RegularizedVI(adata, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path), seed=1, train_size=0.5,
                                               **QUICK)
    for text in ("was trained with seed 0", "the checkpoint's split is kept"):
        assert {w.filename for w in caught if text in str(w.message)} == {__file__}, text


def test_load_warnings_name_the_users_line(tmp_path, monkeypatch):
    """A model loaded onto other counts of its cells (persistence.py), and a saved prior allowed before the refusal
    (priors.py: its fixed level named model_settings.py)."""
    adata = small_adata()
    model = ps.RegularizedVI(adata, **SMALL)
    model.train(max_epochs=1, **QUICK)
    model.save(str(tmp_path / "model"))
    thinned = adata.copy()
    thinned.layers["counts"] = thinned.layers["counts"].copy()
    thinned.layers["counts"].data = np.ceil(thinned.layers["counts"].data / 2)
    assert _files_of(lambda: ps.RegularizedVI.load(str(tmp_path / "model"), adata=thinned), "data differ from those") \
        == {__file__}
    monkeypatch.setattr(ps.RegularizedPriors, "validate", lambda self, saved=False: self)
    older = ps.RegularizedVI(adata, **SMALL, priors=ps.RegularizedPriors(feature_scaling=dist.Uniform(0.5, 2.0)))
    older.save(str(tmp_path / "older"))
    monkeypatch.undo()
    assert _files_of(lambda: ps.RegularizedVI.load(str(tmp_path / "older"), adata.copy(), device="cpu"),
                     "still loads") == {__file__}


def test_query_mapping_warnings_name_the_users_line():
    """Genes padded with zeros (query_genes.py), through prepare_query_anndata and through load_query_data, and a query
    with nothing left to train (query_mapping.py): their fixed levels named scvi_arguments.py."""
    adata = small_adata(batch_key="batch")
    reference = ps.RegularizedVI(adata, **SMALL)
    reference.train(max_epochs=1, **QUICK)
    fewer = adata[:, 5:].copy()
    assert _files_of(lambda: ps.RegularizedVI.prepare_query_anndata(fewer.copy(), reference), "filled with zeros") \
        == {__file__}
    assert _files_of(lambda: ps.RegularizedVI.load_query_data(fewer.copy(), reference, inplace_subset_query_vars=True),
                     "filled with zeros") == {__file__}
    assert _files_of(lambda: ps.RegularizedVI.load_query_data(adata.copy(), reference), "nothing is left to train") \
        == {__file__}


def test_a_query_loaded_as_an_ordinary_model_warns_at_the_users_line(tiny_adata, tmp_path):
    """Its optimiser moments, kept for the new rows only, are dropped on load (checkpoints.py: its fixed level named
    training.py)."""
    known = tiny_adata.obs["batch"] != "batch_2"
    reference_cells = tiny_adata[known].copy()  # set up on its own: batch_2 is a category new to the reference
    ps.RegularizedVI.setup_anndata(reference_cells, layer="counts", batch_key="batch")
    reference = ps.RegularizedVI(reference_cells, **SMALL)
    reference.train(max_epochs=1, **QUICK)
    query = ps.RegularizedVI.load_query_data(tiny_adata[~known].copy(), reference)
    query.train(max_epochs=1, **QUICK)
    query.save(str(tmp_path / "query"))
    assert _files_of(lambda: ps.RegularizedVI.load(str(tmp_path / "query"), tiny_adata[~known].copy()),
                     "optimiser moments") == {__file__}


def test_ndreamer_warnings_name_the_users_line(tiny_adata, tmp_path):
    """The model ITE of a model whose encoder is not told the condition (model_effects.py); a batch holding one arm
    (effects.py, in the design dataclass's __post_init__, under its generated __init__: the fixed level named
    design.py); a saved NDreamer whose batches each hold one arm, loaded (effects.py again, and save_load.py)."""
    with_condition = tiny_adata.copy()
    ps.RegularizedVI.setup_anndata(with_condition, layer="counts", nn_conditioning_covariate_keys=["condition"])
    model = ps.RegularizedVI(with_condition, **SMALL)
    model.train(max_epochs=1, **QUICK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_model = NDreamer.from_model(model, "condition", "control", device="cpu")
    # the model's effects are decoded on two paths (the treated cells again, to widen the intervals)
    assert _files_of(lambda: from_model.estimate_model_ite(num_samples=2), "encoder is not given") == {__file__}
    cells = tiny_adata.obs
    one_arm = tiny_adata[~((cells["batch"] == "batch_1") & (cells["condition"] == "control"))].copy()
    assert _files_of(lambda: NDreamer(one_arm, "condition", "control", batch_key="batch", layer="counts", **TINY),
                     "hold only one of condition") == {__file__}
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    save_with_one_arm_batches(nd, str(tmp_path / "nd"))
    for text in ("No batch holds both", "does not match the saved results"):
        assert _files_of(lambda: NDreamer.load(str(tmp_path / "nd"), device="cpu"), text) == {__file__}, text


def test_multimodal_warnings_name_the_users_line():
    """A modality without counts in a batch, named when the model is built (unmeasured_categories.py) and when a
    predictive check has no cell measured in it (criticism.py)."""
    mdata = batch_without_atac()
    assert _files_of(lambda: ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16), "has no cell with counts") \
        == {__file__}
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16)
    no_atac = np.flatnonzero(mdata.obs["batch"].to_numpy() == "batch_2")[:20]
    for check in (posterior_predictive_check, prior_predictive_check):
        assert _files_of(lambda: check(model, indices=no_atac, num_samples=2), "left out of the check") == {__file__}


def test_a_users_module_named_contextlib_is_the_users_code(tmp_path):
    """Only the standard library's contextlib (and torch's wrappers) are passed through: a warning raised from a user's
    own contextlib.py pointed past it, at its caller."""
    (tmp_path / "contextlib.py").write_text("def call(function, *args):\n    return function(*args)\n")
    spec = importlib.util.spec_from_file_location("users_contextlib", tmp_path / "contextlib.py")
    users = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(users)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        users.call(_package["warn"], "from the user's contextlib.py")
    assert [(w.filename, w.lineno) for w in caught] == [(str(tmp_path / "contextlib.py"), 2)]


def test_code_without_a_file_is_the_users_even_run_from_inside_the_package(monkeypatch):
    # <stdin>, a notebook's or doctest's code: abspath("<stdin>") lies under the working directory, which counted it
    # as the package's when Python ran from inside the package's folder (the warning then named sys:1)
    monkeypatch.chdir(PACKAGE_DIR)
    user_code = compile("def call(message):\n    _package['warn'](message)\n", "<stdin>", "exec")
    namespace = {"_package": _package}
    exec(user_code, namespace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace["call"]("from code without a file")
    assert [(w.filename, w.lineno) for w in caught] == [("<stdin>", 2)]
