"""Route search: it finds a planted best route, its proxies never score an image with itself,
and `route_search` / `stats_head` as transfer methods."""

import itertools

import pytest
import torch

from isomod import IsomodError, ModelConfig, ModularNet, TaskSpec, TrainConfig
from isomod.data.tasks import TaskData
from isomod.methods.search import STRATEGIES, RouteScorer, SearchConfig, ncm_loo, ridge_loo, search_route
from isomod.methods.transfer import transfer

PLANTED = [2, 0, 3]


@pytest.fixture(scope="module")
def planted():
    """A random pool and a task whose labels are a linear function of the features one
    route, `PLANTED`, gives: that route is the one the proxies can score best."""
    torch.manual_seed(0)
    net = ModularNet(ModelConfig(channels=8, num_modules=4, steps=3, stem_stride=4, residual_scale=2.0),
                     [TaskSpec("src", 4, (1, 16, 16))])
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (400, 1, 16, 16), generator=g, dtype=torch.uint8)
    net.add_task(TaskSpec("new", 4, (1, 16, 16)), source="src")
    net.route("new").set_choice(PLANTED)
    net.estimate_stats(x, "new")
    f = net.features(x, "new")
    y = ((f - f.mean(0)) @ torch.randn(f.shape[1], 4, generator=g)).argmax(1)
    return net, x, y


def test_the_planted_route_is_the_best_of_all_routes(planted):
    net, x, y = planted
    scorer = RouteScorer(net, "new", x, x, y, 4, SearchConfig())
    scores = {r: scorer(list(r)) for r in itertools.product(range(4), repeat=3)}
    assert max(scores, key=scores.get) == tuple(PLANTED) and scorer.scored == 64


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("proxy", ("ncm", "ridge"))
def test_every_strategy_finds_the_planted_route_from_another(planted, strategy, proxy):
    net, x, y = planted
    res = search_route(net, "new", x, x, y, [0, 1, 2], SearchConfig(strategy=strategy, proxy=proxy, max_candidates=64))
    assert res.route == PLANTED and res.score > res.start_score + 0.2
    assert 1 < res.candidates <= 64 and res.trace == sorted(res.trace)
    assert net.route("new").indices() == PLANTED and net.route("new").is_discrete


def test_a_search_stops_at_its_candidate_budget(planted):
    net, x, y = planted
    res = search_route(net, "new", x, x, y, [0, 1, 2], SearchConfig(strategy="evolution", max_candidates=5))
    assert res.candidates == 5


def test_leave_one_out_proxies_do_not_score_an_image_with_itself():
    # On noise with two images a class, a class mean that included the scored image would
    # find it most of the time; left out, the proxies are at chance.
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(64, 64, generator=g), torch.arange(64) % 32
    assert ncm_loo(noise, labels, 32) < 0.15 and ridge_loo(noise, labels, 32) < 0.15
    separable = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert ncm_loo(separable, torch.tensor([0, 0, 1, 1]), 2) == 1.0
    with pytest.raises(IsomodError, match="needs two labelled images of some class"):
        ncm_loo(separable[:2], torch.tensor([0, 1]), 2)


def test_route_search_and_stats_head_as_transfer_methods(planted):
    import copy

    net, x, y = planted
    task = TaskData(TaskSpec("tnew", 4, (1, 16, 16)), x[:300], y[:300], x[300:], y[300:])
    quick = TrainConfig(steps=5, batch_size=32, warmup_steps=1, checkpoint_every=0, lr=5e-2, lr_heads=5e-2)
    base = copy.deepcopy(net)
    base.remove_task("new")
    found = transfer(copy.deepcopy(base), task, "route_search", quick, source="src", progress=False,
                     search=SearchConfig(max_candidates=64))
    route = found.model.route("tnew")
    assert route.is_discrete and route.indices() == PLANTED and found.route_steps_changed == 3
    head = found.model.head_of("tnew")
    assert found.params_task == sum(p.numel() for p in head.parameters()) + found.model.stats_count("tnew") + 3
    assert found.info["candidates"] > 1 and found.info["proxy_found"] > found.info["proxy_start"]
    plain = transfer(copy.deepcopy(base), task, "stats_head", quick, source="src", progress=False)
    assert plain.model.route("tnew").indices() == base.route("src").indices()
    assert plain.params_task == found.params_task - 3
