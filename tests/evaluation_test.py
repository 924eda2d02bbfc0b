"""The per-client distribution that every federated evaluation reports beside its pooled metrics."""

import numpy as np
import pytest

from tffpipe import evaluation


def test_client_quantiles_are_over_clients_with_examples_and_keep_each_value_for_a_histogram():
    per_client = {
        "accuracy": np.array([0.8, 0.2, 0.0, 0.5], np.float32),  # in no particular order, as TFF gathers them
        "loss": np.array([1.0, 3.0, 9.0, 2.0], np.float32),
        "num_examples": np.array([5.0, 4.0, 0.0, 6.0], np.float32),  # the third client had nothing to evaluate
        "num_batches": np.array([1.0, 1.0, 0.0, 1.0], np.float32),
    }
    values = evaluation.client_quantiles(per_client)
    # Kept: accuracies (0.2, 0.5, 0.8). numpy's linear p10 of 3 values sits 0.2 of the way from the
    # first to the second: 0.2 + 0.2 * 0.3 = 0.26; p90 symmetrically 0.8 - 0.06 = 0.74.
    assert values["eval/clients"] == 3.0
    assert (values["eval/accuracy_p10"], values["eval/accuracy_p50"], values["eval/accuracy_p90"]) == pytest.approx(
        (0.26, 0.5, 0.74)
    )
    # Losses kept (1, 2, 3): p10 = 1 + 0.2 * 1 = 1.2 (the empty client's 9 is not among them).
    assert (values["eval/loss_p10"], values["eval/loss_p50"], values["eval/loss_p90"]) == pytest.approx((1.2, 2, 2.8))
    np.testing.assert_allclose(values["eval/per_client/accuracy"], [0.2, 0.5, 0.8], rtol=1e-6)
    assert not any("num_examples_" in k or "num_batches" in k for k in values)  # counts are not qualities


def test_no_client_with_examples_gives_only_the_count():
    values = evaluation.client_quantiles({"accuracy": np.zeros(2), "num_examples": np.zeros(2)}, prefix="x")
    assert values == {"x/clients": 0.0}
