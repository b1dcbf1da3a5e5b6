"""Model factories a user could point the CLI at (``user_models:small_mlp``)."""

import torch
from torch.export import Dim


def small_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 4))
    return model.eval(), (torch.randn(3, 16),), ({0: Dim.DYNAMIC},)


def not_a_model():
    return 42


class Untraceable(torch.nn.Module):
    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1


def untraceable():
    return Untraceable(), (torch.randn(3),)


from fxopt.passes import Pass, PassResult, register_pass  # noqa: E402


@register_pass("user-noop")
class UserNoop(Pass):
    """A user's pass living beside the user's model factory."""

    def run(self, graph):
        return PassResult(False, {"seen_nodes": graph.num_nodes()})


def small_mlp_calibration():
    """Calibration inputs for ``small_mlp`` (``--calibration user_models:small_mlp_calibration``)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 16, generator=g),) for _ in range(4)]


import dataclasses  # noqa: E402


@dataclasses.dataclass
class Pair:
    """A user's own output structure, registered with torch's pytree."""

    first: torch.Tensor
    second: torch.Tensor


torch.export.register_dataclass(Pair, serialized_type_name="user_models.Pair")


class PairModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return Pair(self.proj(x), x.sum(-1))


def pair_model():
    torch.manual_seed(0)
    return PairModel().eval(), (torch.randn(3, 4),)
