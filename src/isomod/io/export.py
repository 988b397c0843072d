"""A task's route as a plain static network, and its TorchScript / ONNX files.

    net = export_task(model, "glyphs/greek")        # nn.Module: stem, L steps, head
    save_torchscript(net, "greek.pt")                # torch.jit.load("greek.pt") needs no isomod
    save_onnx(net, "greek.onnx")                     # runs under onnxruntime

For a discrete route, the static network holds only the modules the route uses, each
stored once however often it runs (steps share the same Parameter objects). Normalisation
is folded where that keeps modules shared: a step's second norm goes into its module's
first convolution when the module runs at that step only; other norms stay as one fused
inference batch-norm call (with the module's affine parameters when the modules own them). For a soft route (weight mixing), each step's mixed weights are
computed once and stored as that step's own block, its second norm folded in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from isomod.core.blocks import attention
from isomod.files import write_atomic
from isomod.errors import IsomodError
from isomod.core.network import ModularNet

EXPORT_FORMATS = ("torchscript", "onnx")


Affine = tuple[torch.Tensor, torch.Tensor] | None  # a norm's scale and shift when the norm does not own them


class FrozenNorm(nn.Module):
    """An inference-mode batch norm: statistics and affine parameters as buffers; `affine`
    gives the scale and shift of a statistics-only norm (a module's, or a mixture's)."""

    def __init__(self, norm: nn.BatchNorm2d, affine: Affine = None):
        super().__init__()
        self.eps = float(norm.eps)
        weight, bias = affine if affine is not None else (norm.weight, norm.bias)
        for name, value in (("running_mean", norm.running_mean), ("running_var", norm.running_var),
                            ("weight", weight), ("bias", bias)):
            self.register_buffer(name, value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def fold_norm(weight: torch.Tensor, norm: nn.BatchNorm2d, affine: Affine = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of `norm(conv(x, weight))` as one convolution."""
    gamma, beta = affine if affine is not None else (norm.weight, norm.bias)
    scale = gamma / torch.sqrt(norm.running_var + norm.eps)  # (C,)
    return (weight * scale[:, None, None, None]).detach(), (beta - norm.running_mean * scale).detach()


class StaticStep(nn.Module):
    """`x + conv(relu(norm2(conv(relu(norm1(x))))))` with given, possibly shared, weights.

    With `norm2` None, the first convolution carries it folded in (`bias1`)."""

    def __init__(self, w1: nn.Parameter, w2: nn.Parameter, norm1: FrozenNorm, norm2: FrozenNorm | None,
                 bias1: torch.Tensor | None = None):
        super().__init__()
        self.w1, self.w2 = w1, w2
        self.norm1 = norm1
        self.norm2 = norm2 if norm2 is not None else nn.Identity()
        self.bias1 = nn.Parameter(bias1) if bias1 is not None else None
        self.pad = w1.shape[-1] // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(F.relu(self.norm1(x)), self.w1, self.bias1, padding=self.pad)  # (B, C, H, W)
        return x + F.conv2d(F.relu(self.norm2(h)), self.w2, None, padding=self.pad)


class StaticNet(nn.Module):
    """stem -> the route's steps -> norm, relu, global average pool -> head; plain PyTorch."""

    def __init__(self, stem: nn.Conv2d, steps: list[StaticStep], final_norm: nn.BatchNorm2d, head: nn.Linear,
                 route: list[int], soft: bool = False):
        super().__init__()
        self.soft = soft  # each step runs its own mixture of modules; `route` holds their argmax
        self.stem = stem
        self.steps = nn.ModuleList(steps)
        self.final_norm = FrozenNorm(final_norm)
        self.head = head
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, C, H', W')
        for step in self.steps:
            h = step(h)
        return self.head(F.relu(self.final_norm(h)).mean(dim=(2, 3)))  # (B, K)


class StaticTransformerStep(nn.Module):
    """A pre-norm transformer block with given, possibly shared, weights and fixed layer-norm
    scales and shifts."""

    def __init__(self, weights: list[nn.Parameter], ln1: tuple[torch.Tensor, torch.Tensor],
                 ln2: tuple[torch.Tensor, torch.Tensor], heads: int, eps: float):
        super().__init__()
        self.qkv_w, self.qkv_b, self.proj_w, self.proj_b, self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b = weights
        for name, value in (("ln1_w", ln1[0]), ("ln1_b", ln1[1]), ("ln2_w", ln2[0]), ("ln2_b", ln2[1])):
            self.register_buffer(name, value.detach().clone())
        self.heads, self.eps = heads, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        a = F.layer_norm(x, [c], self.ln1_w, self.ln1_b, self.eps)
        h = x + attention(a, self.qkv_w, self.qkv_b, self.proj_w, self.proj_b, self.heads)
        m = F.layer_norm(h, [c], self.ln2_w, self.ln2_b, self.eps)
        return h + F.linear(F.gelu(F.linear(m, self.fc1_w, self.fc1_b)), self.fc2_w, self.fc2_b)


class StaticViT(nn.Module):
    """patch embedding -> the route's transformer steps -> layer norm, mean over tokens -> head."""

    def __init__(self, stem: nn.Module, steps: list[StaticTransformerStep], final_norm: nn.LayerNorm, head: nn.Linear,
                 route: list[int], soft: bool = False):
        super().__init__()
        self.soft = soft
        self.stem = stem
        self.steps = nn.ModuleList(steps)
        self.final_norm = final_norm
        self.head = head
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, T, C)
        for step in self.steps:
            h = step(h)
        return self.head(self.final_norm(h).mean(dim=1))  # (B, K)


def _layer_norm_affine(norm: nn.LayerNorm, affine: Affine) -> tuple[torch.Tensor, torch.Tensor]:
    if affine is not None:
        return affine
    if norm.weight is None:
        return torch.ones(norm.normalized_shape), torch.zeros(norm.normalized_shape)
    return norm.weight, norm.bias


def _transformer_steps(model: ModularNet, branch, choice: list[int] | None) -> list[StaticTransformerStep]:
    """Discrete (`choice`): each module's weights stored once however often it runs; soft:
    each step's mixed weights."""
    from isomod.core.blocks import TransformerModule

    mixed = model.mixed_params(branch.route) if choice is None else None
    shared: dict[int, list[nn.Parameter]] = {}
    steps = []
    for l in range(branch.route.steps):
        if choice is None:
            params = {name: m[l] for name, m in mixed.items()}
            weights = [nn.Parameter(params[n].detach().clone()) for n in TransformerModule.WEIGHTS]
        else:
            params = dict(model.pool.blocks[choice[l]].named_parameters())
            weights = shared.setdefault(choice[l], [nn.Parameter(params[n].detach().clone())
                                                    for n in TransformerModule.WEIGHTS])
        affine1, affine2 = _affines(params)
        norm1, norm2 = branch.norms[2 * l], branch.norms[2 * l + 1]
        steps.append(StaticTransformerStep(weights, _layer_norm_affine(norm1, affine1),
                                           _layer_norm_affine(norm2, affine2), model.config.heads, norm1.eps))
    return steps


@torch.no_grad()
def export_task(model: ModularNet, task: str) -> StaticNet | StaticViT:
    """`task`'s network as a StaticNet (a StaticViT for transformer blocks) in eval mode,
    computing what `model(x, task)` computes in eval mode (to float rounding where norms are
    folded); a soft route needs weight mixing."""
    model.require_routes("export")
    route = model.route(task)
    branch = model.branch(task)
    if not route.is_discrete and model.config.mixing != "weight":
        raise IsomodError(f"task {task!r} has a soft route under output mixing, which runs every module at each "
                          "step; discretise it first (model.discretize(task)) or use weight mixing")
    choice = route.indices()  # for a soft route, the argmax per step, for display; every step runs its mixture
    source = model.head_of(task)
    device = model.stem.weight.device
    head = nn.Linear(source.in_features, source.out_features).to(device)
    head.load_state_dict(source.state_dict())
    net = STATIC[model.config.block](model, branch, choice, route.is_discrete, head)
    return net.to(device).eval().requires_grad_(False)


def _static_conv(model: ModularNet, branch, choice: list[int], discrete: bool, head: nn.Linear) -> StaticNet:
    steps = _discrete_steps(model, branch, choice) if discrete else _mixed_steps(model, branch)
    stem = nn.Conv2d(model.stem.in_channels, model.stem.out_channels, model.stem.kernel_size, model.stem.stride,
                     model.stem.padding).to(model.stem.weight.device)
    stem.load_state_dict(model.stem.state_dict())
    return StaticNet(stem, steps, branch.norms[-1], head, choice, soft=not discrete)


def _static_vit(model: ModularNet, branch, choice: list[int], discrete: bool, head: nn.Linear) -> StaticViT:
    steps = _transformer_steps(model, branch, choice if discrete else None)
    return StaticViT(copy.deepcopy(model.stem), steps, copy.deepcopy(branch.norms[-1]), head, choice, soft=not discrete)


# How each block kind (`isomod.core.blocks.KINDS`) is exported: a static network of its steps.
STATIC = {"conv": _static_conv, "transformer": _static_vit}


def _affines(params: dict[str, torch.Tensor]) -> tuple[Affine, Affine]:
    """The affine parameters of a step's two norms from a module's (or a mixture's)
    parameters; None where the step's own norms hold them."""
    if "g1" not in params:
        return None, None
    return (params["g1"], params["b1"]), (params["g2"], params["b2"])


def _discrete_steps(model: ModularNet, branch, choice: list[int]) -> list[StaticStep]:
    shared: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    steps = []
    for l, c in enumerate(choice):
        block = model.pool.blocks[c]
        affine1, affine2 = _affines(dict(block.named_parameters()))
        norm1, norm2 = branch.norms[2 * l], branch.norms[2 * l + 1]
        w2 = shared.setdefault(c, (nn.Parameter(block.w1.detach().clone()), nn.Parameter(block.w2.detach().clone())))[1]
        if choice.count(c) == 1:
            w1, bias1 = fold_norm(block.w1, norm2, affine2)
            steps.append(StaticStep(nn.Parameter(w1), w2, FrozenNorm(norm1, affine1), None, bias1))
        else:
            steps.append(StaticStep(shared[c][0], w2, FrozenNorm(norm1, affine1), FrozenNorm(norm2, affine2)))
    return steps


def _mixed_steps(model: ModularNet, branch) -> list[StaticStep]:
    mixed = model.mixed_params(branch.route)  # (L, ...) each
    steps = []
    for l in range(branch.route.steps):
        affine1, affine2 = _affines({name: m[l] for name, m in mixed.items()})
        w1, bias1 = fold_norm(mixed["w1"][l], branch.norms[2 * l + 1], affine2)
        steps.append(StaticStep(nn.Parameter(w1), nn.Parameter(mixed["w2"][l].detach().clone()),
                                FrozenNorm(branch.norms[2 * l], affine1), None, bias1))
    return steps


class MultiTaskNet(nn.Module):
    """Several tasks' static networks behind one input: `forward(x, task)` with `task` `(B,)`
    the index of each image's task; logits `(B, K_max)`, `-inf` past each task's classes.
    Scriptable; each task's images run its own network."""

    def __init__(self, nets: list[nn.Module], classes: list[int]):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.classes = classes
        self.k_max = max(classes)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], self.k_max), float("-inf"), device=x.device, dtype=x.dtype)
        for i, net in enumerate(self.nets):
            rows = (task == i).nonzero().flatten()
            if rows.numel() > 0:
                out[rows, : self.classes[i]] = net(x[rows])
        return out


def export_tasks(model: ModularNet, tasks: list[str]) -> MultiTaskNet:
    """Several tasks of `model` as one static network taking a task index per image."""
    if len(set(tasks)) != len(tasks) or not tasks:
        raise IsomodError(f"give each task once, at least one: got {tasks}")
    nets = [export_task(model, t) for t in tasks]
    return MultiTaskNet(nets, [model.check_task(t).num_classes for t in tasks]).eval()


def multi_metadata(model: ModularNet, tasks: list[str], net: MultiTaskNet) -> dict:
    """A multi-task file's metadata: per task index, what `metadata` gives for one task."""
    one = [metadata(model, t, n) for t, n in zip(tasks, net.nets)]
    return {"format": "isomod-export-multitask", "tasks": [m["task"] for m in one],
            "class_names": {m["task"]: m["class_names"] for m in one}, "input_shape": one[0]["input_shape"],
            "value_range": [0.0, 1.0],
            "input": "float32 images (batch, channels, height, width), pixel values divided by 255; and the index "
                     "of each image's task in `tasks` (batch,), int64",
            "output": "logits (batch, most classes of any task), -inf past each image's task's classes"}


def metadata(model: ModularNet, task: str, net: StaticNet) -> dict:
    """What a user of an exported file needs to feed it and read its output: the task, its
    class names (output index -> name), the input shape and value range, and the route."""
    spec = model.check_task(task)
    names = list(spec.class_names) or [str(i) for i in range(spec.num_classes)]
    return {"format": "isomod-export", "task": spec.name, "class_names": names,
            "input_shape": list(spec.input_shape), "channels": spec.input_shape[0], "value_range": [0.0, 1.0],
            "input": "float32 images (batch, channels, height, width), pixel values divided by 255",
            "output": "logits (batch, classes); softmax gives class probabilities",
            "route": list(net.route), "soft_route": bool(net.soft)}


def read_torchscript_metadata(path: str | Path) -> dict:
    """The metadata an exported TorchScript file carries (`isomod.json`), read with plain torch."""
    import json

    extra = {METADATA: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA])


METADATA = "isomod.json"


def example_input(model: ModularNet, task: str, batch: int = 2) -> torch.Tensor:
    spec = model.check_task(task)
    return torch.rand((batch, *spec.input_shape), device=model.stem.weight.device)


def save_torchscript(net: StaticNet, path: str | Path, meta: dict | None = None) -> Path:
    """Script `net` and save it atomically, `meta` as its extra file `isomod.json`;
    `torch.jit.load(path)` runs it without isomod."""
    import json
    import warnings

    path = Path(path)
    extra = {METADATA: json.dumps(meta or {})}
    with warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it is still what runs without Python deps.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
        write_atomic(path, lambda f: torch.jit.save(scripted, f, _extra_files=extra))
    return path


def save_onnx(net: StaticNet, path: str | Path, example: torch.Tensor, meta: dict | None = None) -> Path:
    """Export `net` to ONNX with a dynamic batch size, its input named `images` and its output
    `logits`, `meta` in the model's metadata (each value as JSON); needs the `onnx` and
    `onnxscript` packages; written atomically."""
    import importlib.util
    import json
    import logging
    import warnings

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise IsomodError(f"ONNX export needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}")
    path = Path(path)
    batch = torch.export.Dim("batch", min=1)
    # The exporter logs a warning for every torchvision operator it cannot register.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # raised inside torch's exporter
            program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
                                        input_names=["images"], output_names=["logits"])
    finally:
        registration.setLevel(level)
    proto = program.model_proto
    for key, value in (meta or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    data = proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
    return path
