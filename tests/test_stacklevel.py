"""user_stacklevel: a package warning points at the first frame outside the package, however deep the call went."""

import importlib.util
import inspect
import warnings

import pyro_scmodels as ps
from pyro_scmodels._stacklevel import PACKAGE_DIR, user_stacklevel

from ._ndreamer_tiny import tiny_nd

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
    """The files named by the warnings holding ``text`` that ``call()`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return {w.filename for w in caught if text in str(w.message)}


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
