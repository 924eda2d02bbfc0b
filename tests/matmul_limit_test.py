"""The arithmetic of the batched-matmul limit that client groups are measured against."""

import pytest

from benchmarks import matmul_limit

W2_MLP = [(784, 200), (200, 200), (200, 62)]  # EMNIST's 62 classes


def test_a_dense_step_counts_forward_weight_and_input_gradient_gemms():
    # First layer: forward + weight gradient, 2 * 2*784*200 = 627,200; the others also
    # their input gradient: 3 * 2*200*200 = 240,000 and 3 * 2*200*62 = 74,400.
    assert matmul_limit.step_flops(W2_MLP, 1) == 627_200 + 240_000 + 74_400
    assert matmul_limit.step_flops(W2_MLP, 2000) == 2000 * 941_600
    assert matmul_limit.step_flops([(784, 62)], 20) == 20 * 2 * 2 * 784 * 62  # linear: no input gradient


def test_the_rate_is_the_step_s_flops_over_its_median_time():
    r = matmul_limit.measure([(8, 4), (4, 2)], rows=16, seconds=0.0)
    assert r["calls"] == 5
    assert r["gflops_per_second"] == pytest.approx(
        matmul_limit.step_flops([(8, 4), (4, 2)], 16) / r["step_seconds_median"] / 1e9
    )


def test_layers_parse_as_in_x_out_and_bad_ones_name_the_value():
    assert matmul_limit.parse_layers(["784x200", "200x10"]) == [(784, 200), (200, 10)]
    with pytest.raises(ValueError, match="'784'"):
        matmul_limit.parse_layers(["784"])
