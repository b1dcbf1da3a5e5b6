"""A custom pass written with fxopt's rewrite engine: SiLU spelt out as
``x * sigmoid(x)`` becomes one op, which ``fuse-linear-act`` then fuses
into the linear before it."""

import torch
import torch.nn.functional as F

import fxopt
from fxopt.passes import register_pass
from fxopt.passes.rewrite import Pattern, RewritePass


def swish(x):
    return x * torch.sigmoid(x)


def silu(x):
    return F.silu(x)


@register_pass("fuse-swish")
class FuseSwish(RewritePass):
    """x * sigmoid(x), in either operand order -> silu(x)."""

    patterns = [Pattern("swish", swish, silu)]


class Swish(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * x


def main():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), Swish(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    graph = fxopt.trace(model, (x,))
    result = fxopt.PassManager("canonicalize,fuse-swish,fuse-linear-act,dce").run(graph)
    print(result.records[1].stats["swish"])  # {'found': 1, 'rewritten': 1, 'skipped': {}}
    fused = fxopt.compile(result.graph, "onnxruntime")
    parity = fxopt.compare(model(x), fused(x))
    print(parity)  # Parity(max_abs_err=~1e-7, scale=..., cosine=1.0)
    return result, parity


if __name__ == "__main__":
    main()
