"""A deployed site trusts nothing it is sent: a hostile server's messages, handed to the
site's own ClientApp exactly as its SuperNode hands them, with Flower's Message API.

Each attack of the site-trust issue: the site declines, or stays within its own budget at
its own delta with noise in every release, checked from its ledger by an independent
accountant (Google's dp-accounting). And what leaves the site is exactly what
docs/threat-model.md lists.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import independent_rdp_epsilon
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedrnn.client.app import app
from fedrnn.client.ledger import Ledger
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.models import build_model

BUDGET_EPSILON, BUDGET_DELTA = 3.0, 1e-6
PROPOSAL = RunConfig(task="classify", labels="sick,well", features="hr,temp", hidden_size=8,
                     batch_size=8, rounds=3, epsilon=8.0, run_id="hostile")
_IDS = itertools.count()
THREAT_MODEL = Path(__file__).resolve().parents[2] / "docs" / "threat-model.md"


@pytest.fixture
def site(tmp_path, series_csv):
    """A site started as `fedrnn client` starts it: its records, ledger and own policy."""
    node_config = {"data": str(series_csv), "ledger": str(tmp_path / "site.sqlite"),
                   "name": "ward", "budget-epsilon": BUDGET_EPSILON,
                   "budget-delta": BUDGET_DELTA, "accountant": "rdp", "eval-fraction": 0.25,
                   "evaluate": True}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def send(context: Context, kind: str = "train", server_round: int = 1,
         weights: dict | None = None, **changes) -> Message:
    """What a hostile ServerApp sends: any config, any weights; the site's reply."""
    config = {**PROPOSAL.to_flat(), **{k.replace("_", "-"): v for k, v in changes.items()},
              P.ROUND: server_round}
    weights = weights or build_model(PROPOSAL).state_dict()
    content = RecordDict({P.ARRAYS: ArrayRecord(weights), P.CONFIG: ConfigRecord(config)})
    metadata = Metadata(run_id=1, message_id=f"m{next(_IDS)}", src_node_id=1,
                        dst_node_id=context.node_id, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600.0, message_type=kind)
    return app(Message(content=content, metadata=metadata), context)


def ledger_of(context: Context) -> Ledger:
    return Ledger(context.node_config["ledger"])


def assert_within_budget(context: Context) -> None:
    """Every release noised, every record's loss within the site's own budget at its own
    delta, recomputed by an independent accountant."""
    with ledger_of(context) as ledger:
        releases = ledger.releases()
        assert all(r.noise_multiplier > 0 and r.delta == BUDGET_DELTA for r in releases)
        for cohort in ledger.cohorts_of_site("ward"):
            assert independent_rdp_epsilon(ledger.history(cohort), BUDGET_DELTA) \
                <= BUDGET_EPSILON * 1.001
        assert ledger.budget().epsilon == BUDGET_EPSILON
        assert ledger.budget().delta == BUDGET_DELTA


def declined(reply: Message, reason: str) -> bool:
    # the reply carries the code word and nothing else of the site's
    return reply.has_error() and reply.error.reason == reason and not reply.has_content()


@pytest.mark.parametrize("attack", [
    {"epsilon": math.inf},  # switch the noise off
    {"epsilon": math.inf, "noise_multiplier": 0.0},
    {"dp": False},
    {"dp_level": "user"},  # the raw update would leave the site
    {"accountant": "gdp"},  # an accountant that under-counts small runs
    {"epsilon": math.nan},
])
def test_a_proposal_outside_the_sites_policy_is_declined(site, attack):
    for kind in ("train", "evaluate"):
        reply = send(site, kind, **attack)
        assert declined(reply, "policy"), (kind, attack)
        assert reply.error.code == P.DECLINED_POLICY
    with ledger_of(site) as ledger:
        assert ledger.releases() == []  # nothing was charged, nothing trained


def test_the_server_cannot_raise_the_budget_pick_the_delta_or_stop_the_noise(site):
    # every round asks for more: a budget of 1000, delta 0.9, no explicit noise, a huge
    # epsilon; the site trains within its own budget until its records are spent
    replies = [send(site, "train", server_round=r, budget_epsilon=1000.0, budget_delta=0.9,
                    delta=0.9, epsilon=1e6, noise_multiplier=0.0, rounds=1)
               for r in range(1, 6)]
    trained = [r for r in replies if not r.has_error()]
    assert trained and all(r.content[P.METRICS][P.NOISE_MULTIPLIER] > 0 for r in trained)
    assert declined(replies[-1], "budget")  # once every record is spent
    assert_within_budget(site)


def test_evaluation_is_a_charged_dp_release_on_the_sites_own_split(site):
    # a crafted model and eval-fraction 0.99: the site keeps its own split, answers with
    # noised statistics and charges them to the evaluation records
    crafted = {k: torch.full_like(v, 0.3) for k, v in build_model(PROPOSAL).state_dict().items()}
    answers = [send(site, "evaluate", weights=crafted, eval_fraction=0.99, seed=r)
               for r in range(3)]
    for reply in answers:
        assert not reply.has_error()
    seen = {tuple(sorted(a.content[P.METRICS].items(), key=str)) for a in answers}
    assert len(seen) > 1  # noised: the same question, other answers
    with ledger_of(site) as ledger:
        releases = ledger.releases()
    assert [r.purpose for r in releases] == ["evaluate"] * 3
    # the site's own quarter of its 24 records (by its keyed hash), not the server's 99%
    held_out = releases[0].records
    assert releases[1].records == held_out and 1 <= held_out <= 14
    assert_within_budget(site)


def test_no_evaluation_at_a_site_that_says_no(site):
    site.node_config["evaluate"] = False
    assert declined(send(site, "evaluate"), "policy")


def test_noise_does_not_follow_the_servers_seed(site):
    a, b = (send(site, "train", seed=0, noise_multiplier=5.0) for _ in range(2))
    wa, wb = (m.content[P.ARRAYS].to_torch_state_dict() for m in (a, b))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_errors_carry_a_code_word_and_nothing_of_the_sites(site):
    # labels the site's records do not fit: the site's text names them and its file
    reply = send(site, "train", labels="a,b")
    assert declined(reply, "data") and reply.error.code == P.FAILED_DATA
    # a model of another shape fails inside the site
    reply = send(site, "train", weights={"x": torch.zeros(1)})
    assert declined(reply, "internal")


def _documented(section: str) -> set[str]:
    """The field names listed in a table of docs/threat-model.md under ``section``."""
    text = THREAT_MODEL.read_text()
    part = text.split(f"<!-- leaves:{section} -->")[1].split("<!-- /leaves -->")[0]
    return set(re.findall(r"^\| `([^`]+)` \|", part, flags=re.M))


def test_what_leaves_a_site_is_exactly_what_the_threat_model_lists(site):
    model = build_model(PROPOSAL)
    trained = send(site, "train")
    assert set(trained.content.keys()) == {P.ARRAYS, P.METRICS}
    assert set(trained.content[P.ARRAYS].keys()) == set(model.state_dict())
    assert set(trained.content[P.METRICS].keys()) == _documented("train")
    evaluated = send(site, "evaluate")
    assert set(evaluated.content.keys()) == {P.METRICS}
    # a classification run: the lm's perplexity and the forecast's mae are not among them
    assert set(evaluated.content[P.METRICS].keys()) == _documented("evaluate") - {
        "perplexity", "mae"}
    assert P.TRAIN_LOSS not in trained.content[P.METRICS]
    # the FedAvg weight is the release's public batch count, not the records' count
    metrics = trained.content[P.METRICS]
    with ledger_of(site) as ledger:
        release = ledger.releases()[0]
    # (the site's own minimum batch, 16, over the proposal's 8)
    assert metrics[P.NUM_EXAMPLES] == round(max(PROPOSAL.batch_size, 16) / release.sample_rate)
    assert metrics[P.EPSILON] > 0
    assert set(P.REASONS.values()) == _documented("errors")


def test_weights_crafted_to_test_the_records_are_refused_before_any_charge(site):
    # a NaN (or huge) row: only records holding that token or value would turn NaN, an
    # exact answer whatever the noise. Refused as policy, nothing charged.
    for bad in (math.nan, math.inf, 1e6):
        weights = build_model(PROPOSAL).state_dict()
        name = next(iter(weights))
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = bad
        for kind in ("train", "evaluate"):
            assert declined(send(site, kind, weights=weights), "policy")
    with ledger_of(site) as ledger:
        assert ledger.releases() == []


def test_a_non_finite_record_does_not_change_the_shape_of_an_evaluation():
    import numpy as np

    from fedrnn.client.evaluation import release

    zero = lambda n: np.zeros(n)  # noqa: E731  no noise: the sums themselves
    clean = release(np.array([0.5, 0.5]), np.array([1.0, 1.0]), PROPOSAL, sigma=1.0,
                    normal=zero)
    poisoned = release(np.array([0.5, math.nan]), np.array([1.0, math.nan]), PROPOSAL,
                       sigma=1.0, normal=zero)
    assert all(math.isfinite(v) for k, v in poisoned.items() if k != "auroc")
    assert poisoned["num-examples"] == clean["num-examples"]


def test_labels_a_run_lacks_leave_records_out_instead_of_declining(site):
    # a server probing for a rare label gets no refusal back: records of other classes
    # simply take no part
    assert not send(site, "train", labels="well,hiv").has_error()


def test_the_site_never_trains_with_a_batch_below_its_own_minimum(site):
    reply = send(site, "train", batch_size=1)
    with ledger_of(site) as ledger:
        release = ledger.releases()[-1]
    # 1 / sample rate is the number of batches of 16, not the number of records
    assert release.sample_rate == 1 / math.ceil(release.records / 16)
    assert reply.content[P.METRICS][P.NUM_EXAMPLES] % 16 == 0


def test_a_ledger_another_user_could_have_planted_is_refused(site, tmp_path):
    planted = tmp_path / "planted.sqlite"
    Ledger(planted).close()
    planted.chmod(0o644)  # readable (and so possibly replaced) by others
    site.node_config["ledger"] = str(planted)
    assert declined(send(site, "train"), "internal")
    link = tmp_path / "link.sqlite"
    link.symlink_to(tmp_path / "site.sqlite")
    site.node_config["ledger"] = str(link)
    assert declined(send(site, "train"), "internal")
