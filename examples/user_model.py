"""A user's own model for the command line: ``fxopt optimize
examples.user_model:factory`` (run from the repository root, or put this
folder on PYTHONPATH), with calibration inputs from ``examples.user_model:calibration``."""

import torch
from torch.export import Dim


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def factory():
    """``(model, example_inputs, dynamic_shapes)``."""
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(4, 64),), ({0: Dim.DYNAMIC},)


def calibration():
    """A list of model inputs, each like the example inputs."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 64, generator=g),) for _ in range(4)]
