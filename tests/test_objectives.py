"""The one loop's seams: objectives that own parameters and draw extra batches, and what
`fit` leaves behind (the layering itself: `test_layers.py`)."""


import pytest
import torch
import torch.nn.functional as F

from isomod import IsomodError, ModelConfig, ModularNet, Objective, Output, TrainConfig, Trainer
from isomod.training.objectives import Batch


def tiny(tasks, seed=0):
    torch.manual_seed(seed)
    return ModularNet(ModelConfig(channels=8, num_modules=3, steps=3, stem_stride=4), [t.spec for t in tasks])


class Scaled(Objective):
    """Cross-entropy of the batch times a learned scale, plus the cross-entropy of a batch
    drawn from another task: an objective with parameters and extra batches."""

    def __init__(self, other: str):
        super().__init__()
        self.other = other
        self.log_scale = torch.nn.Parameter(torch.zeros(()))
        self.drawn = []

    def forward(self, model, batch: Batch) -> Output:
        logits = model(batch.x, batch.task)
        x, y = batch.extra.draw(self.other, 8)
        self.drawn.append(x.shape[0])
        extra = F.cross_entropy(model(x, self.other), y)
        loss = self.log_scale.exp() * F.cross_entropy(logits, batch.y) + extra + 0.1 * self.log_scale ** 2
        return Output(loss, logits, {"scale": self.log_scale.exp().item()})


def test_an_objective_trains_its_own_parameters_draws_batches_and_resumes_exactly(two_tasks, tmp_path):
    a, b = two_tasks
    cfg = TrainConfig(steps=12, batch_size=16, warmup_steps=2, checkpoint_every=6, log_every=3, lr=1e-2)
    full, objective = tiny(two_tasks), Scaled(b.name)
    trainer = Trainer(full, two_tasks, cfg, out_dir=tmp_path / "full", objective=objective, train_tasks=[a.name],
                      progress=False)
    trainer.fit()
    assert objective.log_scale.item() != 0.0 and objective.drawn == [8] * 12
    # Each log record carries the metric's mean over its interval (3 steps each).
    assert len(trainer.history) == 4 and all(0.5 < h["scale"] < 2.0 for h in trainer.history)
    assert trainer.history[0]["scale"] != trainer.history[-1]["scale"]

    class Crash(Scaled):
        def forward(self, model, batch):
            if len(self.drawn) == 8:
                raise KeyboardInterrupt  # killed after the step-6 checkpoint
            return super().forward(model, batch)

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny(two_tasks), two_tasks, cfg, out_dir=tmp_path / "run", objective=Crash(b.name),
                train_tasks=[a.name], progress=False).fit()
    resumed, again = tiny(two_tasks, seed=7), Scaled(b.name)
    Trainer(resumed, two_tasks, cfg, out_dir=tmp_path / "run", objective=again, train_tasks=[a.name],
            progress=False).fit(resume=True)
    assert torch.equal(again.log_scale, objective.log_scale)
    assert all(torch.equal(p, q) for p, q in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_an_objective_asking_for_a_task_the_run_lacks_is_refused(two_tasks):
    a, _ = two_tasks
    with pytest.raises(IsomodError, match="asked for images of 'nowhere', which this run was not given"):
        Trainer(tiny(two_tasks), [a], TrainConfig(steps=2, batch_size=8, checkpoint_every=0), objective=Scaled("nowhere"),
                progress=False).fit()


def test_fit_puts_back_every_flag_and_mode_it_changed(two_tasks):
    model = tiny(two_tasks)
    model.pool.freeze([1])
    model.eval()
    model.branch(two_tasks[0].name).norms[0].train()
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    params = model.param_groups([two_tasks[1].name])
    Trainer(model, two_tasks, TrainConfig(steps=4, batch_size=8, checkpoint_every=0, discretize_at=0.5),
            train_tasks=[two_tasks[1].name], params=params, progress=False).fit()
    # The route the schedule discretised is frozen, as `set_choice` and a loaded checkpoint
    # leave a discrete route (fit once gave its logits back their gradient).
    frozen = model.route(two_tasks[1].name).logits
    assert model.route(two_tasks[1].name).is_discrete and not frozen.requires_grad
    assert [p.requires_grad for p in model.parameters()] == [
        False if p is frozen else f for p, f in zip(model.parameters(), flags)]
    assert [m.training for m in model.modules()] == modes
    assert model.pool.frozen() == [False, True, False]


def test_a_trained_model_and_its_checkpoint_have_the_same_trainable_parameters(two_tasks, tmp_path):
    from isomod.io.checkpoint import load_checkpoint, save_checkpoint

    model = tiny(two_tasks)
    Trainer(model, two_tasks, TrainConfig(steps=4, batch_size=8, checkpoint_every=0, discretize_at=0.5),
            progress=False).fit()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ck"))
    assert [(n, p.requires_grad) for n, p in loaded.named_parameters()] == [
        (n, p.requires_grad) for n, p in model.named_parameters()]
