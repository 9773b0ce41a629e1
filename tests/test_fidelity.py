"""Which of two held-out measurements is the more faithful (spa/fidelity.py)."""

import numpy as np
import pytest

from spa import fidelity


def _scores(n: int, flips: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-class scores of ``n`` samples, all ``[0, 3]``, and a copy whose first ``flips``
    samples prefer the other class by ``strength`` (small: a flip that costs little KL)."""
    dense = np.tile([0.0, 3.0], (n, 1))
    other = dense.copy()
    other[:flips] = [strength, 0.0]
    return dense, other


def test_an_agreement_within_sampling_noise_is_decided_by_kl():
    dense, a = _scores(26, flips=8, strength=3.0)
    _, b = _scores(26, flips=9, strength=0.01)
    ma, mb = fidelity.compare([dense], [a]), fidelity.compare([dense], [b])
    assert ma["samples"] == mb["samples"] == 26
    assert mb["agreement"] < ma["agreement"] and mb["kl"] < ma["kl"]
    # One image of 26 is 0.038 of agreement: b's much lower KL wins.
    assert fidelity.better(mb, ma) and not fidelity.better(ma, mb)


def test_an_agreement_beyond_sampling_noise_decides():
    dense, a = _scores(1000, flips=100, strength=3.0)
    _, b = _scores(1000, flips=200, strength=0.01)
    ma, mb = fidelity.compare([dense], [a]), fidelity.compare([dense], [b])
    assert mb["kl"] < ma["kl"]
    assert ma["agreement"] - mb["agreement"] == pytest.approx(0.1)  # 2 standard errors: 0.03
    assert fidelity.better(ma, mb) and not fidelity.better(mb, ma)


def test_change_names_the_measure_that_decides():
    """A warning that fidelity got worse shows the measure that decided: an agreement that
    rose within its sampling noise is not the reason (it read "agreement 0.8333 → 1.0000"
    as worse)."""
    before = {"agreement": 5 / 6, "kl": 0.0018, "samples": 6}
    after = {"agreement": 1.0, "kl": 0.0020, "samples": 6}
    assert not fidelity.better(after, before) and fidelity.deciding(after, before) == "kl"
    assert fidelity.change(before, after) == (
        "kl 0.0018 → 0.0020 (agreement 0.8333 → 1.0000 is within the sampling noise of 6 "
        "samples)")
    far = {"agreement": 0.5, "kl": 0.0010, "samples": 1000}
    assert fidelity.change({**far, "agreement": 0.7}, far) == "agreement 0.7000 → 0.5000"
    assert fidelity.change({"cosine": 0.9, "relative_error": 0.2},
                           {"cosine": 0.9, "relative_error": 0.3}) == (
        "relative_error 0.2000 → 0.3000 (cosine 0.9000 → 0.9000 is unchanged)")


def test_measures_without_a_sample_count_compare_by_the_headline():
    a = {"agreement": 0.65, "kl": 0.3}
    b = {"agreement": 0.62, "kl": 0.1}
    assert fidelity.better(a, b)


def test_describe_names_the_sample_count():
    dense, a = _scores(26, flips=8, strength=3.0)
    text = fidelity.describe(fidelity.compare([dense], [a]))
    assert text.startswith("agreement 0.6923, kl ") and text.endswith("(of 26 samples)")


def test_per_token_outputs_are_compared_at_attended_tokens():
    rng = np.random.default_rng(0)
    real = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    logits = rng.standard_normal((2, 4, 5))
    cache = rng.standard_normal((2, 4, 4, 3))  # [N, heads, T, head size]: heads == T here
    other = logits.copy()
    other[real == 0] = -logits[real == 0]  # padding's outputs change: the argmax flips there
    other_cache = cache * 1.5
    whole = fidelity.compare([logits, cache], [other, other_cache])
    assert whole["agreement"] == pytest.approx(5 / 8)
    masked = fidelity.compare([logits, cache], [other, other_cache], real)
    assert masked["agreement"] == 1.0 and masked["cosine"] == pytest.approx(1.0)
    assert masked["kl"] == pytest.approx(0.0, abs=1e-12)
    # only the cache differs now, all of it counted: 0.5 of its norm over both outputs' norms
    num, den = 0.25 * np.sum(cache ** 2), np.sum(logits[real == 1] ** 2) + np.sum(cache ** 2)
    assert masked["relative_error"] == pytest.approx(np.sqrt(num / den))
    other[0, 1] = -logits[0, 1]  # one attended token's answer flips: 1 of the 5 counted
    assert fidelity.compare([logits, cache], [other, cache], real)["agreement"] == \
        pytest.approx(4 / 5)
