"""``pyro_scmodels._validation`` raises one exception type per kind of error, naming the argument and the value,
and returns canonical values."""

import numpy as np
import pytest

from pyro_scmodels import _validation as V


# --- one exception type per kind of error ------------------------------------------------------------
CHECKS = [
    # check, a value of the wrong type, a value of the right type but out of range
    (V.positive_int, "3", 0),
    (V.non_negative_int, 2.5, -1),
    (lambda n, v: V.integer(n, v, minimum=2, maximum=5), [3], 7),
    (V.positive_float, "1e-3", -0.5),
    (V.non_negative_float, None, -1.0),
    (V.rate, "0.1", 1.0),
    (V.probability, True, 1.5),
    (V.fraction, "half", 0.0),
    (lambda n, v: V.number(n, v, minimum=0.0, strict_minimum=True), object(), float("nan")),
    (lambda n, v: V.choice(n, v, ("data", "prior")), 3, "bogus"),
]
IDS = ["positive_int", "non_negative_int", "integer", "positive_float", "non_negative_float", "rate", "probability",
       "fraction", "number", "choice"]


@pytest.mark.parametrize("check, wrong_type, wrong_value", CHECKS, ids=IDS)
def test_wrong_type_is_type_error_naming_the_argument(check, wrong_type, wrong_value):
    with pytest.raises(TypeError, match=r"^my_argument must be .*got " + _escaped(wrong_type)):
        check("my_argument", wrong_type)


@pytest.mark.parametrize("check, wrong_type, wrong_value", CHECKS, ids=IDS)
def test_wrong_value_is_value_error_naming_argument_and_value(check, wrong_type, wrong_value):
    with pytest.raises(ValueError, match=r"^my_argument must be .*got " + _escaped(wrong_value)):
        check("my_argument", wrong_value)


def _escaped(value):
    import re

    return re.escape(repr(float(value) if isinstance(value, float) else value))


def test_checks_return_canonical_values(tmp_path):
    assert V.positive_int("n", 3.0) == 3 and isinstance(V.positive_int("n", np.int64(3)), int)
    assert V.fraction("train_size", 1) == 1.0 and V.rate("p", 0) == 0.0
    assert V.choice("split", None, ("train", "validation"), allow_none=True) is None
    assert V.optional(V.positive_int, "batch_size", None) is None
    assert V.boolean("flag", np.bool_(True)) is True
    with pytest.raises(TypeError, match="flag must be True or False, got 1"):
        V.boolean("flag", 1)
    with pytest.raises(ValueError, match=r"Pass either split or indices, not both"):
        V.exclusive("split", "train", "indices", [0])
    with pytest.raises(KeyError, match=r"Column 'x' not found in adata\.obs\. Available columns: a, b"):
        V.present("x", ["a", "b"], "adata.obs", "column")
    with pytest.raises(FileNotFoundError, match="figure_path: the folder .*missing"):
        V.output_path("figure_path", tmp_path / "missing" / "f.png")
    with pytest.raises(TypeError, match="figure_path must be a file path"):
        V.output_path("figure_path", 3)
