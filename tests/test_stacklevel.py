"""user_stacklevel: a package warning points at the first frame outside the package, however deep the call went."""

import inspect
import warnings

from pyro_scmodels._stacklevel import PACKAGE_DIR, user_stacklevel

# functions whose frames count as the package's: compiled under a file name inside its directory
_PACKAGE_SOURCE = '''
import warnings
from pyro_scmodels._stacklevel import user_stacklevel

def warn(message):
    warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

def deeper(message, depth):
    return warn(message) if depth == 0 else deeper(message, depth - 1)

def level():
    return user_stacklevel()

def through(callback):
    return callback()
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
