"""The site's own randomness: DP noise and Poisson batches nobody else can regenerate, and a
plan (rate, steps) that is exactly what training runs and what the accountant records."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import fedrnn.client.training
from fedrnn.client.training import make_private, poisson_loader, train
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import SequenceTensors, client_data, resolve
from fedrnn.shared.models import build_model
from fedrnn.shared.privacy import sample_rate, steps_per_round
from fedrnn.shared.randomness import SiteRandomness

# batch counts k where Opacus's int(1/q) steps per epoch, q = 1/k, is k - 1
OFF_BY_ONE = [k for k in range(1, 400) if int(1 / (1 / k)) != k]


def _config(**overrides) -> RunConfig:
    settings = {"hidden_size": 8, "embedding_dim": 4, "batch_size": 8, **overrides}
    return resolve(RunConfig(dataset="synthetic", clients=2, **settings))


def _records(config: RunConfig, n: int) -> SequenceTensors:
    """``n`` records, the synthetic client's repeated as needed."""
    data = client_data(config, 0).train
    idx = torch.arange(n) % len(data)
    return SequenceTensors(data.inputs[idx], data.lengths[idx], data.labels[idx])


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _trained(config, data, start, randomness, noise_multiplier=1.0):
    model = copy.deepcopy(start)
    result = train(model, data, config, noise_multiplier=noise_multiplier,
                   randomness=randomness)
    return _weights(model), result


def test_os_keyed_trainings_differ_though_torch_is_seeded_alike():
    """The noise and batches do not come from torch's global generator: seeding it the same
    before two deployed-site trainings does not make them the same."""
    config = _config()
    data = client_data(config, 0).train
    torch.manual_seed(0)
    start = build_model(config)
    torch.manual_seed(0)
    first, _ = _trained(config, data, start, SiteRandomness.from_os())
    torch.manual_seed(0)
    second, _ = _trained(config, data, start, SiteRandomness.from_os())
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("noise_multiplier", [1.0, None])
def test_seeded_trainings_are_identical_whatever_torch_was_seeded_with(noise_multiplier):
    config = _config(dropout=0.3, num_layers=2)
    data = client_data(config, 0).train
    start = build_model(config)
    torch.manual_seed(0)
    first, _ = _trained(config, data, start, SiteRandomness.from_seed(7, 3, 1),
                        noise_multiplier)
    torch.manual_seed(12345)
    again, _ = _trained(config, data, start, SiteRandomness.from_seed(7, 3, 1),
                        noise_multiplier)
    other, _ = _trained(config, data, start, SiteRandomness.from_seed(7, 3, 2),
                        noise_multiplier)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_seeds_key_distinct_streams():
    def draws(*seeds):
        return SiteRandomness.from_seed(*seeds).gaussian((4,), std=1.0)

    assert torch.equal(draws(1, 23), draws(1, 23))
    for other in [(12, 3), (23, 1), (1, 23, 0), (123,), (1, -23)]:
        assert not torch.equal(draws(1, 23), draws(*other))
    for bad in [(), (1.0,), ("1",), (True,)]:
        with pytest.raises(ValueError):
            SiteRandomness.from_seed(*bad)
    with pytest.raises(ValueError):
        SiteRandomness(2**128)


def test_gaussian_has_the_asked_shape_dtype_and_spread():
    rng = SiteRandomness.from_seed(0)
    noise = rng.gaussian((1000, 1000), std=2.5)
    assert noise.shape == (1000, 1000) and noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.01
    assert noise.std().item() == pytest.approx(2.5, rel=0.005)
    assert rng.gaussian((3, 2), std=1.0, dtype=torch.float64).dtype == torch.float64
    assert rng.gaussian((3, 2), std=1.0, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(rng.gaussian((5,), std=0.0), torch.zeros(5))
    with pytest.raises(ValueError):
        rng.gaussian((5,), std=-1.0)


def test_poisson_mask_includes_each_record_at_the_rate():
    rng = SiteRandomness.from_seed(1)
    mask = rng.poisson_mask(1_000_000, 0.01)
    assert mask.dtype == bool and mask.shape == (1_000_000,)
    assert mask.mean() == pytest.approx(0.01, rel=0.03)
    assert not rng.poisson_mask(100, 0.0).any() and rng.poisson_mask(100, 1.0).all()
    seed = rng.torch_seed()
    assert 0 <= seed < 2**63


def test_the_optimizer_adds_noise_of_std_sigma_times_clip_from_the_site():
    """A step whose data gradient is zero (an empty batch) moves a plain SGD's weights by
    the noise alone, divided by the expected batch size: N(0, (sigma * clip)**2) each."""
    sigma, clip, n, batch = 1.3, 0.7, 3087, 64
    model = torch.nn.Linear(1000, 1000, bias=False)
    dataset = TensorDataset(torch.zeros(n, 1000))
    randomness = SiteRandomness.from_seed(5)
    loader = poisson_loader(dataset, batch, randomness)
    private, optimizer, engine = make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), loader, noise_multiplier=sigma,
        clip_norm=clip, accountant="rdp", randomness=randomness)
    # N / ceil(N/B) = 3087 / 49 = 63 exactly (Opacus's int(N * q) would make it 62)
    assert optimizer.expected_batch_size == 63
    noises = []
    for _ in range(2):
        before = _weights(model)[0]
        torch.manual_seed(0)  # torch's generator is not the noise's source
        optimizer.zero_grad(set_to_none=True)
        model.weight.grad = torch.zeros_like(model.weight)
        optimizer.step()
        noises.append((before - model.weight.detach()) * optimizer.expected_batch_size)
    for noise in noises:
        assert abs(noise.mean().item()) < 0.01 * sigma * clip
        assert noise.std().item() == pytest.approx(sigma * clip, rel=0.01)
    # fresh, independent noise every step, though torch was seeded alike before each
    assert (noises[0] - noises[1]).std().item() == pytest.approx(2**0.5 * sigma * clip, rel=0.01)
    assert engine.accountant.history == [(sigma, sample_rate(n, batch), 2)]
    private._close()


def test_empty_poisson_batches_keep_the_records_structure_even_first():
    data = TensorDataset(torch.ones(2, 5, dtype=torch.long), torch.ones(2),
                         torch.zeros(2, dtype=torch.long))
    seed = next(s for s in range(100)
                if len(next(iter(poisson_loader(data, 1, SiteRandomness.from_seed(s))))[1]) == 0)
    batches = list(poisson_loader(data, 1, SiteRandomness.from_seed(seed)))
    assert len(batches) == 2
    inputs, lengths, labels = batches[0]
    assert inputs.shape == (0, 5) and lengths.shape == (0,) and labels.shape == (0,)
    assert (inputs.dtype, lengths.dtype, labels.dtype) == (torch.long, torch.float32,
                                                          torch.long)


def test_training_steps_through_empty_batches_with_noise(monkeypatch):
    config = _config(batch_size=1, local_epochs=20)
    data = _records(config, 2)  # q = 1/2: a quarter of the 40 batches are empty
    sizes = []
    real_backward = fedrnn.client.training.backward

    def spy(model, optimizer, batch, task):
        sizes.append(len(batch[1]))
        return real_backward(model, optimizer, batch, task)

    monkeypatch.setattr(fedrnn.client.training, "backward", spy)
    start = build_model(config)
    after, result = _trained(config, data, start, SiteRandomness.from_seed(3))
    assert result.steps == 40 == len(sizes) and 0 in sizes and max(sizes) > 0
    assert result.history == [(1.0, 0.5, 40)]
    assert all(not torch.equal(a, b) for a, b in zip(_weights(start), after, strict=True))


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_the_loader_runs_the_planned_rate_and_steps_for_every_n(batch):
    """What the site charges (shared.privacy) is what the loader samples, and what Opacus's
    accountant records (rate ``1 / len(loader)``) for every N, also where ``int(1/q)``
    is one short (N = 93 * 64 with batch 64, and the other OFF_BY_ONE batch counts)."""
    rng = SiteRandomness.from_seed(0)
    extra = [n for k in OFF_BY_ONE[:3] for n in range((k - 1) * batch + 1, k * batch + 1)]
    for n in [*range(1, 5001), *extra]:
        loader = poisson_loader(TensorDataset(torch.zeros(n)), batch, rng)
        k = -(-n // batch)
        assert len(loader) == steps_per_round(n, batch, 1) == k
        assert loader.batch_sampler.sample_rate == sample_rate(n, batch) == 1 / len(loader)
        assert steps_per_round(n, batch, 3) == 3 * k


@pytest.mark.parametrize("n,batch", [(93, 1), (99, 1), (105, 1), (93 * 16 - 5, 16),
                                     (93 * 64, 64), (92 * 64 + 1, 64), (99 * 64 - 30, 64)])
def test_training_history_is_the_plan_where_opacus_would_run_one_step_short(n, batch):
    config = _config(batch_size=batch, local_epochs=2, hidden_size=4, embedding_dim=2)
    data = _records(config, n)
    assert int(1 / sample_rate(n, batch)) == steps_per_round(n, batch, 1) - 1  # Opacus's
    _, result = _trained(config, data, build_model(config), SiteRandomness.from_seed(n),
                         noise_multiplier=0.9)
    plan = (0.9, sample_rate(n, batch), steps_per_round(n, batch, 2))
    assert result.history == [plan]
    assert result.steps == plan[2]


def test_the_sampler_is_poisson_not_fixed_size():
    n, batch = 1000, 100
    loader = poisson_loader(TensorDataset(torch.arange(n)), batch, SiteRandomness.from_seed(9))
    sizes = [len(indices) for indices in loader.batch_sampler]
    assert len(sizes) == 10 and len(set(sizes)) > 1
    assert np.mean(sizes) == pytest.approx(batch, rel=0.2)
