import numpy as np
import pytest

from hnseg_infer.channels.intensity import apply_ops, validate_ops
from hnseg_infer.errors import RecipeError

X = np.array([-2000.0, -110.0, 40.0, 190.0, 3000.0], np.float32)


def run(ops, x=X, source="ct", suv=1.0):
    return apply_ops(x.copy(), validate_ops(ops, source=source, where="t"), suv_per_stored_value=suv)


def test_window_to_minus_one_one_and_ct_enhancement_channels():
    w = [{"op": "window", "min": -110, "max": 190, "to": [-1, 1]}]
    x = run(w)
    assert np.allclose(x, [-1, -1, 0, 1, 1])
    assert np.allclose(run(w + [{"op": "power", "exponent": 2}]), x ** 2)
    assert np.allclose(run(w + [{"op": "cbrt"}]), np.cbrt(x))  # signed cube root keeps the sign


def test_sigmoid_zscore_minmax_and_nnunet_ct():
    assert np.allclose(run([{"op": "sigmoid"}], np.array([0.0], np.float32)), 0.5)
    z = run([{"op": "zscore", "over": "all"}])
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    nz = run([{"op": "zscore", "over": "nonzero"}], np.array([0, 1, 2, 3], np.float32), source="pet")
    assert nz[0] == 0 and abs(nz[1:].mean()) < 1e-6
    assert np.allclose(run([{"op": "minmax", "to": [0, 1]}], np.array([2, 4, 6], np.float32)), [0, 0.5, 1])
    ct = run([{"op": "nnunet_ct", "percentile_00_5": -1000, "percentile_99_5": 1000, "mean": 50, "std": 100}])
    assert np.allclose(ct, (np.clip(X, -1000, 1000) - 50) / 100)


def test_suv_op_uses_the_detected_factor_and_only_for_pet():
    assert np.allclose(run([{"op": "suv"}, {"op": "clip", "min": 0, "max": 50}], np.array([5000, 1e6], np.float32),
                           source="pet", suv=1 / 5000), [1, 50])
    with pytest.raises(RecipeError, match="only to a 'pet'"):
        validate_ops([{"op": "suv"}], source="ct", where="t")


@pytest.mark.parametrize("ops,message", [
    ([{"op": "gamma"}], "unknown op 'gamma'"),
    ([{"op": "window", "min": 0, "max": 1}], "misses ['to']"),
    ([{"op": "clip", "min": 0, "max": 1, "mode": "x"}], "unknown key(s) ['mode']"),
    ([{"op": "window", "min": 5, "max": 1, "to": [0, 1]}], "max > min"),
    ([{"op": "zscore", "over": "body"}], "'all' or 'nonzero'"),
    (["sigmoid"], "must be an object"),
])
def test_bad_ops_are_recipe_errors(ops, message):
    with pytest.raises(RecipeError) as info:
        validate_ops(ops, source="ct", where="recipe.json models[0]")
    assert message in str(info.value) and "recipe.json models[0]" in str(info.value)
