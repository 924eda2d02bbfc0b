import dataclasses

import pytest
import tensorflow as tf

from tffpipe import accounting, aggregation, configs, devices, models

HOUR = devices.SECONDS_PER_HOUR


def profile(cid: str, speed: float = 100.0, dropout: float = 0.0, window=(0.0, 24.0), offset: float = 0.0):
    return devices.DeviceProfile(
        client_id=cid,
        tier="mid",
        examples_per_second=speed,
        upload_bytes_per_second=1e12,
        download_bytes_per_second=1e12,
        utc_offset_hours=offset,
        window_start_hour=window[0],
        window_hours=window[1],
        dropout_probability=dropout,
    )


def rounds(profiles, *, k, deadline=0.0, overselect=0.0, seed=0, update_bytes=1000, examples=100, parameters=None):
    return devices.DeviceRounds(
        {p.client_id: p for p in profiles},
        {p.client_id: examples for p in profiles},
        clients_per_round=k,
        epochs=1,
        model_bytes=2000,
        update_bytes=update_bytes,
        model_parameters=parameters or devices.REFERENCE_PARAMETERS,
        config=configs.DeviceConfig(overselect=overselect, deadline_seconds=deadline, start_hour_utc=0.0),
        seed=seed,
    )


def test_with_a_deadline_only_fast_enough_devices_contribute():
    # 100 examples each: 10 ex/s takes 10 s, 50 ex/s 2 s, 1000 ex/s 0.1 s; the deadline is 5 s.
    sim = rounds([profile("slow", 10.0), profile("mid", 50.0), profile("fast", 1000.0)], k=3, deadline=5.0)
    outcome = sim.outcome(1)
    assert set(outcome.selected) == {"slow", "mid", "fast"}
    assert set(outcome.reported) == {"mid", "fast"} and outcome.late == ("slow",)
    assert outcome.duration_seconds == 5.0  # fewer than k reported: the server waited for the deadline


def test_round_closes_at_the_kth_report_and_extra_devices_are_late():
    sim = rounds([profile("a", 10.0), profile("b", 50.0), profile("c", 1000.0)], k=2, overselect=0.5)
    outcome = sim.outcome(1)
    assert outcome.reported == ("c", "b") and outcome.late == ("a",)
    assert outcome.duration_seconds == pytest.approx(100 / 50.0 + 2000 / 1e12 + 1000 / 1e12)


def test_compute_time_scales_with_the_models_parameters():
    # 100 examples at 50 ex/s take 2 s with the reference model (small_cnn's 54,462 parameters);
    # cifg_lstm's 1,422,638 take 1,422,638 / 54,462 = 26.12x as long: 52.2 s, past a 30 s deadline.
    assert models.create_small_cnn(62).count_params() == devices.REFERENCE_PARAMETERS
    fleet = [profile("a", 50.0), profile("b", 1000.0)]
    small = rounds(fleet, k=2, deadline=30.0).outcome(1)
    large = rounds(fleet, k=2, deadline=30.0, parameters=1_422_638).outcome(1)
    assert small.duration_seconds == pytest.approx(2.0) and set(small.reported) == {"a", "b"}
    assert large.reported == ("b",) and large.late == ("a",)  # b: 0.1 s x 26.12 = 2.6 s
    assert large.duration_seconds == 30.0
    alone = rounds([profile("a", 50.0)], k=1, parameters=1_422_638).outcome(1)
    assert alone.duration_seconds == pytest.approx(2.0 * 1_422_638 / 54_462)


def test_dropouts_contribute_nothing():
    sim = rounds([profile("gone", dropout=1.0), profile("stays")], k=2)
    outcome = sim.outcome(1)
    assert outcome.dropped == ("gone",) and outcome.reported == ("stays",)


def test_bytes_are_update_size_times_reporters_and_less_with_compression():
    sim = rounds([profile(f"d{i}") for i in range(5)], k=3, overselect=0.5, update_bytes=217_848)
    outcome = sim.outcome(1)
    assert len(outcome.selected) == 5 and len(outcome.reported) == 3  # ceil(3 * 1.5) asked
    assert outcome.bytes_up == 217_848 * 3
    assert outcome.bytes_down == 2000 * 5  # every asked device downloads the model
    # small_cnn: only the 800x62 dense kernel (49,600 > 20,000 elements) is quantized to 8 bits,
    # packed 28 bits to an int32 (TFF leaves headroom for the sum): ceil(49,600 * 8 / 28) = 14,172
    # words = 56,688 bytes, + 8 (min, max), + 4 * (144 + 16 + 4,608 + 32 + 62) = 76,144 instead of 217,848.
    specs = [tf.TensorSpec(s) for s in ([3, 3, 1, 16], [16], [3, 3, 16, 32], [32], [800, 62], [62])]
    assert aggregation.upload_bytes(specs, compression=False) == 217_848
    assert aggregation.upload_bytes(specs, compression=True) == 76_144
    # TFF's threshold: 20,000 elements stay float32 (80,000 bytes), 20,001 are quantized (5,715 words + 8).
    assert aggregation.upload_bytes([tf.TensorSpec([20_000])], compression=True) == 80_000
    assert aggregation.upload_bytes([tf.TensorSpec([20_001])], compression=True) == 5_715 * 4 + 8


def test_same_seed_gives_same_participation_and_a_restart_replays_the_clock():
    population = [devices.create_profile(f"c{i:03d}", seed=1) for i in range(200)]
    a = rounds(population, k=10, deadline=120.0, seed=4)
    b = rounds(population, k=10, deadline=120.0, seed=4)
    assert [a.sample(r) for r in range(1, 8)] == [b.sample(r) for r in range(1, 8)]
    fresh = rounds(population, k=10, deadline=120.0, seed=4)
    # Asked for round 7 first, as a resumed run does, it replays rounds 1-6 itself
    # (tests/train_e2e_test.py resumes a --device_model run end to end).
    assert fresh.outcome(7) == a.outcome(7)
    assert rounds(population, k=10, deadline=120.0, seed=5).sample(1) != a.sample(1)
    assert devices.create_profile("c001", seed=1) == population[1]


def test_devices_outside_their_window_are_never_selected():
    population = [devices.create_profile(f"c{i:03d}", seed=2) for i in range(300)]
    sim = rounds(population, k=20, deadline=300.0)
    by_id = {p.client_id: p for p in population}
    for r in range(1, 40):
        outcome = sim.outcome(r)
        assert outcome.available < len(population)
        assert all(by_id[c].available_at(outcome.start_seconds) for c in outcome.selected)


def test_window_wraps_past_midnight_in_local_time():
    night = profile("n", window=(22.0, 8.0), offset=2.0)  # 22:00-06:00 local = 20:00-04:00 UTC
    assert night.available_at(21 * HOUR) and night.available_at(3 * HOUR)
    assert not night.available_at(12 * HOUR) and not night.available_at(4.5 * HOUR)


def test_profiles_round_trip_through_csv_and_missing_rows_are_named(tmp_path):
    population = devices.create_profiles(["a", "b"], seed=3)
    devices.save_profiles(population, str(tmp_path / "p.csv"))
    assert devices.load_profiles(str(tmp_path / "p.csv"), ["a", "b"]) == population
    with pytest.raises(ValueError, match="no row for 1 clients"):
        devices.load_profiles(str(tmp_path / "p.csv"), ["a", "b", "c"])
    (tmp_path / "bad.csv").write_text("client_id,tier\na,mid\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        devices.load_profiles(str(tmp_path / "bad.csv"), ["a"])
    text = (tmp_path / "p.csv").read_text().splitlines()
    header, row = text[0], text[1].split(",")
    row[header.split(",").index("dropout_probability")] = "nan"
    (tmp_path / "nan.csv").write_text("\n".join([header, ",".join(row)]))
    with pytest.raises(devices.ProfileError, match=r"nan.csv line 2: device a: dropout_probability must be a finite"):
        devices.load_profiles(str(tmp_path / "nan.csv"), ["a"])


def test_an_unknown_tier_is_refused_when_the_profiles_are_loaded(tmp_path):
    path = tmp_path / "p.csv"
    devices.save_profiles(devices.create_profiles(["a", "b"], seed=3), str(path))
    header, *lines = path.read_text().splitlines()
    row = lines[1].split(",")
    row[header.split(",").index("tier")] = "ultra"
    path.write_text("\n".join([header, lines[0], ",".join(row)]))
    # Before training starts (program.check loads the file), not in participation_by_tier after the last round.
    with pytest.raises(
        devices.ProfileError, match=r"p.csv line 3: device b: tier is 'ultra'; use one of low, mid, high"
    ):
        devices.load_profiles(str(path), [])


def test_the_privacy_label_and_bound_change_when_the_device_model_is_on():
    ideal = configs.ExperimentConfig(dp=configs.DpConfig(configs.Mechanism.FIXED, 0.7))
    mobile = dataclasses.replace(ideal, devices=configs.DeviceConfig())
    assert ideal.sampling is configs.Sampling.POISSON and mobile.sampling is configs.Sampling.DEVICE
    plans = [accounting.PrivacyPlan(configs.Mechanism.FIXED, 0.7, 50, 3400, c.sampling, 1e-5) for c in (ideal, mobile)]
    assert "no amplification by sampling" in accounting.describe(plans[1])
    assert "Poisson" in accounting.describe(plans[0])
    # Without amplification every round is a full Gaussian(z) mechanism: far larger epsilon.
    assert accounting.epsilon(plans[1], 50) > 10 * accounting.epsilon(plans[0], 50)
    with pytest.raises(ValueError, match="cannot hold under the device model"):
        dataclasses.replace(mobile, privacy=configs.PrivacyConfig(sampling=configs.Sampling.POISSON))
