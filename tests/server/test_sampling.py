"""Client sampling is a seeded draw over partition ids; faults are seeded per site and round."""

import pytest
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedrnn.client.faults import DROP, STRAGGLE, fault_of
from fedrnn.server.sampling import ClientSampler, simulation_slots
from fedrnn.server.strategy import build_strategy
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.partition import is_holdout_client
from fedrnn.shared.errors import FedrnnError


class _Grid:
    """The one Grid method strategies call while configuring a round."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


def test_same_seed_same_clients_whatever_the_node_ids():
    config = RunConfig(clients=50, clients_per_round=7, seed=3)
    a = ClientSampler([1000 + i for i in range(50)], config)
    b = ClientSampler([9_000_000 - 17 * i for i in range(50)], config)  # other random ids
    for server_round in range(1, 6):
        assert a.sample(server_round, "train") == b.sample(server_round, "train")
    rounds = [tuple(a.sample(r, "train")) for r in range(1, 6)]
    assert len(set(rounds)) > 1 and all(len(r) == 7 for r in rounds)
    other = ClientSampler(range(50), config.replace(seed=4))
    assert [other.sample(r, "train") for r in range(1, 6)] != [list(r) for r in rounds]
    assert a.sample(1, "evaluate") == a.sample(1, "evaluate")  # evaluation: same size
    assert len(a.sample(1, "evaluate")) == 7


def test_strategy_configures_exactly_the_drawn_nodes():
    config = RunConfig(clients=20, clients_per_round=4)
    nodes = [500 + 3 * i for i in range(20)]
    sampler = ClientSampler(nodes, config)
    drawn = sampler.sample(2, "train")
    view = sampler.view(_Grid(nodes), sampler.assign(drawn))
    strategy = build_strategy(config, available=20)
    # FedAvg.configure_train's own sampling, applied to the view it is given
    size = max(int(len(list(view.get_node_ids())) * strategy.fraction_train),
               strategy.min_train_nodes)
    taken, _ = sample_nodes(view, strategy.min_available_nodes, size)
    assert sorted(taken) == [nodes[i] for i in drawn]


def test_simulation_slots_serve_the_drawn_clients():
    config = RunConfig(clients=1000, clients_per_round=5, eval_clients_per_round=8)
    # a round's evaluation and the next round's training are in flight together: each
    # phase has slots of its own
    assert simulation_slots(config) == 5 + 8
    assert simulation_slots(RunConfig(clients=10)) == 20  # all take part, in both phases
    slots = [70 + i for i in range(13)]
    sampler = ClientSampler(slots, config, slots=True)
    drawn = sampler.sample(3, "train")
    assignment = sampler.assign(drawn, "train")
    assert list(assignment) == slots[:5] and list(assignment.values()) == drawn
    partitions = sampler.round_config(assignment)["partitions"]
    assert partitions == [*drawn, *[-1] * 8]  # slot i serves partitions[i]; idle ones -1
    assert max(drawn) > 13  # clients beyond the slot count are served
    evaluators = sampler.assign(sampler.sample(3, "evaluate"), "evaluate")
    assert list(evaluators) == slots[5:] and not set(evaluators) & set(assignment)
    assert sampler.round_config(evaluators)["partitions"][:5] == [-1] * 5
    assert ClientSampler(slots, config).round_config({}) == {}  # deployment: nothing sent
    with pytest.raises(FedrnnError, match="simulation slots"):
        ClientSampler(slots[:12], config, slots=True)


def test_one_record_clients_either_train_or_evaluate():
    config = RunConfig(clients=400, partitioner="record", clients_per_round=30,
                       eval_clients_per_round=20)
    sampler = ClientSampler(range(400), config)
    train, evaluate = sampler.sample(1, "train"), sampler.sample(1, "evaluate")
    holdout = {i for i in range(400)
               if is_holdout_client(i, seed=0, eval_fraction=config.eval_fraction)}
    assert 40 < len(holdout) < 120  # about eval-fraction (20%) of the clients
    assert not set(train) & holdout and set(evaluate) <= holdout
    with pytest.raises(FedrnnError, match="only"):
        ClientSampler(range(400), config.replace(eval_clients_per_round=300))


def test_faults_are_seeded_and_at_the_requested_rates():
    faults = [fault_of(seed=1, server_round=r, partition_id=p, dropout_rate=0.2,
                       straggler_rate=0.1) for r in range(1, 21) for p in range(100)]
    assert 0.15 < faults.count(DROP) / len(faults) < 0.25
    assert 0.06 < faults.count(STRAGGLE) / len(faults) < 0.14
    again = [fault_of(seed=1, server_round=r, partition_id=p, dropout_rate=0.2,
                      straggler_rate=0.1) for r in range(1, 21) for p in range(100)]
    assert again == faults
    assert fault_of(seed=1, server_round=1, partition_id=0, dropout_rate=0.0,
                    straggler_rate=0.0) is None


def test_one_record_clients_are_sampled_only_for_the_phase_they_hold_a_record_for():
    config = RunConfig(clients=6, partitioner="natural", seed=3)
    sizes = [5, 1, 1, 1, 1, 9]
    sampler = ClientSampler(range(6), config, sizes=sizes)
    trainers = set(sampler.sample(1, "train"))
    evaluators = set(sampler.sample(1, "evaluate"))
    assert {0, 5} <= trainers & evaluators  # larger clients do both
    singles = {1, 2, 3, 4}
    assert singles <= trainers ^ evaluators  # a single record: exactly one role
    assert trainers | evaluators == set(range(6))
