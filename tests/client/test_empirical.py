"""The empirical audit's guesses, its Bonferroni-corrected bound and the exposure, on
losses whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrnn.client.empirical.exposure import exposure
from fedrnn.client.empirical.one_run import GUESS_PLANS, guesses, one_run_bound
from fedrnn.client.empirical.white_box import adam_scale, clipped, release_coefficients
from fedrnn.shared.audit_bounds import epsilon_lower_bound


def test_guesses_count_in_for_the_lowest_losses_and_out_for_the_highest():
    losses = np.array([0.1, 5.0, 0.2, 3.0, 1.0])
    included = np.array([True, False, False, True, True])
    # in: 0.1 (right), 0.2 (wrong); out: 5.0 (right)
    assert guesses(losses, included, k_in=2, k_out=1) == (3, 2)


def test_separated_losses_give_a_clear_bound_and_coin_flips_none():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    separated = np.where(included, rng.uniform(0, 1, 1000), rng.uniform(2, 3, 1000))
    result = one_run_bound({"loss": separated}, included, delta=1e-5)
    assert result["correct"] == result["guesses"]  # every plan is right on such losses
    assert result["epsilon_lower_bound"] > 3
    assert len(result["tried"]) == len(GUESS_PLANS)
    # the correction: each plan at 1 - 0.05 / plans, so below the uncorrected bound
    uncorrected = epsilon_lower_bound(m=1000, r=result["guesses"], v=result["correct"],
                                      delta=1e-5)
    assert result["epsilon_lower_bound"] < uncorrected
    noise = one_run_bound({"loss": rng.normal(size=1000)}, included, delta=1e-5)
    assert noise["epsilon_lower_bound"] < 0.5


def test_the_correction_covers_every_score_and_plan_pair():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    separated = np.where(included, 0.0, 1.0) + rng.uniform(0, 0.5, 1000)
    one = one_run_bound({"loss": separated}, included, delta=0.0)
    two = one_run_bound({"loss": separated, "release": rng.normal(size=1000)}, included,
                        delta=0.0)
    assert len(two["tried"]) == 2 * len(GUESS_PLANS)
    assert {t["score"] for t in two["tried"]} == {"loss", "release"}
    assert two["confidence_per_plan"] == 1 - 0.05 / (2 * len(GUESS_PLANS))
    assert two["best_score"] == "loss"
    assert two["epsilon_lower_bound"] < one["epsilon_lower_bound"]  # the larger correction
    # a run without releases is charged for both scores all the same
    charged = one_run_bound({"loss": separated}, included, delta=0.0,
                            pairs=2 * len(GUESS_PLANS))
    assert charged["epsilon_lower_bound"] == two["epsilon_lower_bound"]
    with pytest.raises(ValueError, match="must cover"):
        one_run_bound({"loss": separated, "release": separated}, included, delta=0.0, pairs=7)


def _canary_gradients(rng, m=1000, p=4000):
    # canaries that share a common part (their region, their label) plus their own
    common = rng.normal(size=p)
    return 0.8 * common + rng.normal(size=(m, p)) / np.sqrt(p) * 3, common


def test_an_update_that_moves_the_included_canaries_gives_a_clear_bound():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    gradients, common = _canary_gradients(rng)
    # a descent step on the included canaries, plus the rest of the site's records (noise
    # in every direction) and a large shift along what all canaries share
    update = -0.01 * gradients[included].sum(0) - 2.0 * common \
        + rng.normal(size=gradients.shape[1]) * 0.01
    scores = -release_coefficients(gradients, update)
    result = one_run_bound({"release": scores}, included, delta=0.0)
    assert result["epsilon_lower_bound"] > 2
    # the loss drop alone (the inner product with each gradient) is swamped by the shift
    naive = one_run_bound({"drop": gradients @ update}, included, delta=0.0)
    assert naive["epsilon_lower_bound"] < result["epsilon_lower_bound"]


def test_a_noise_only_update_gives_no_bound():
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    gradients, common = _canary_gradients(rng)
    update = rng.normal(size=gradients.shape[1]) - 2.0 * common
    scores = -release_coefficients(gradients, update)
    assert one_run_bound({"release": scores}, included, delta=0.0)["epsilon_lower_bound"] < 0.3


def test_adam_scale_is_the_root_mean_square_of_a_poisson_batch_gradient():
    site = np.array([[1.0, 0.0], [3.0, 0.0]])
    canaries = np.array([[0.0, 2.0], [0.0, 2.0]])  # one of them trained on, in expectation
    moments = (site.sum(0), (site ** 2).sum(0), len(site))
    scale = adam_scale(moments, canaries, batch_size=2.0, noise_std=4.0)
    n = 3.0  # two records and half of two canaries
    mean = np.array([4.0, 2.0]) / n
    square = np.array([10.0, 4.0])
    expected = np.sqrt(mean ** 2 + square / (2.0 * n) + (4.0 / 2.0) ** 2)
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    # without the site's records the canaries alone estimate it
    alone = adam_scale((0.0, 0.0, 0), canaries, batch_size=2.0, noise_std=0.0)
    np.testing.assert_allclose(alone, [1e-8, np.sqrt(4.0 + 4.0 / 2.0) + 1e-8])


def _adam_round(gradients, included, site, *, steps=28, rate=0.04, lr=0.01, seed=0):
    """A round of the site's Adam optimizer (torch's own) without noise, each step's
    gradient the mean of a Poisson batch of its records' gradients, as DP-SGD forms it."""
    import torch

    rng = np.random.default_rng(seed)
    records = np.vstack([site, gradients[included]])
    weights = torch.zeros(records.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    batch = rate * len(records)
    for _ in range(steps):
        chosen = rng.random(len(records)) < rate
        weights.grad = torch.from_numpy(records[chosen].sum(0) / batch)
        optimizer.step()
    return weights.detach().numpy()


def test_adams_scaling_recovers_the_canaries_an_adam_round_trained_on():
    rng = np.random.default_rng(4)
    m, p = 400, 2000
    included = rng.random(m) < 0.5
    # coordinates of very different sizes, as a recurrent network's are: Adam's steps are
    # large where gradients are small, which a plain gradient step does not model
    sizes = np.exp(rng.uniform(-8, 0, p))
    gradients = clipped(rng.normal(size=(m, p)) * sizes, 1.0)
    site = clipped(rng.normal(size=(800, p)) * sizes, 1.0)
    update = sum(_adam_round(gradients, included, site, seed=s) for s in range(5))
    moments = (site.sum(0), (site ** 2).sum(0), len(site))
    scale = adam_scale(moments, gradients, batch_size=0.04 * (800 + m / 2), noise_std=0.0)
    scaled = one_run_bound({"release": -release_coefficients(gradients / scale, update)},
                           included, delta=0.0)
    plain = one_run_bound({"release": -release_coefficients(gradients, update)}, included,
                          delta=0.0)
    assert scaled["epsilon_lower_bound"] > 1.0
    assert scaled["epsilon_lower_bound"] > plain["epsilon_lower_bound"] + 0.5


def test_a_run_whose_data_moved_scores_with_the_canaries_alone(tmp_path, caplog):
    from fedrnn.client.empirical.one_run import canary_site_records
    from fedrnn.client.empirical.scores import AuditedRun
    from fedrnn.shared.config import RunConfig, dump_toml
    from fedrnn.shared.data.canaries import CanaryDraw

    config = RunConfig(data=str(tmp_path / "moved.csv"), task="classify", canaries=4)
    (tmp_path / "config.toml").write_text(dump_toml(config))
    run = AuditedRun(run_dir=tmp_path, config=config, model=None,
                     draw=CanaryDraw(site="site-0", seed=1, included=(True, False) * 2))
    assert canary_site_records(run) is None
    assert "moved.csv" in caplog.text and "canaries alone" in caplog.text


def test_exposure_is_log2_space_less_log2_rank():
    candidates = np.arange(1000, dtype=float)  # losses 0..999
    rank, bits = exposure(-1.0, candidates, space=10 ** 6)  # likelier than every candidate
    assert rank == 1 and bits == math.log2(10 ** 6)
    rank, bits = exposure(500.0, candidates, space=10 ** 6)  # half the sample is likelier
    assert rank == 1 + 0.5 * (10 ** 6 - 1)
    assert bits == math.log2(10 ** 6) - math.log2(rank)


def test_a_run_without_canaries_ends_in_one_message(tmp_path, capsys):
    from fedrnn.shared.cli import main

    assert main(["audit", str(tmp_path), "--empirical"]) != 0
    err = capsys.readouterr().err
    assert "no canaries" in err and "--canaries M" in err and "Traceback" not in err


def test_canary_gradients_are_clipped_as_dp_sgd_adds_them():
    gradients = np.array([[3.0, 4.0], [0.3, 0.4]])
    out = clipped(gradients, 1.0)
    assert np.allclose(out, [[0.6, 0.8], [0.3, 0.4]])  # the small one is left alone
