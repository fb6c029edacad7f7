"""The empirical audit's guesses, its Bonferroni-corrected bound and the exposure, on
losses whose answer is known."""

from __future__ import annotations

import math

import numpy as np

from fedrnn.client.empirical.exposure import exposure
from fedrnn.client.empirical.one_run import GUESS_PLANS, guesses, one_run_bound
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
    result = one_run_bound(separated, included, delta=1e-5)
    assert result["correct"] == result["guesses"]  # every plan is right on such losses
    assert result["epsilon_lower_bound"] > 3
    assert len(result["tried"]) == len(GUESS_PLANS)
    # the correction: each plan at 1 - 0.05 / plans, so below the uncorrected bound
    uncorrected = epsilon_lower_bound(m=1000, r=result["guesses"], v=result["correct"],
                                      delta=1e-5)
    assert result["epsilon_lower_bound"] < uncorrected
    noise = one_run_bound(rng.normal(size=1000), included, delta=1e-5)
    assert noise["epsilon_lower_bound"] < 0.5


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
