"""A pass that walks the graph itself instead of using the rewrite engine:
neg(neg(x)) -> x."""

import torch

import fxopt
from fxopt.passes import Pass, PassResult, register_pass


@register_pass("fold-double-neg")
class FoldDoubleNeg(Pass):
    """neg(neg(x)) -> x. Refuses when the inner neg has other users."""

    def run(self, graph):
        folded = 0
        for node in self.walk(graph, target=torch.ops.aten.neg.default):
            inner = node.args[0]
            if getattr(inner, "target", None) == torch.ops.aten.neg.default and len(inner.users) == 1:
                node.replace_all_uses_with(inner.args[0])
                graph.fx.erase_node(node)
                graph.fx.erase_node(inner)
                folded += 1
        return PassResult(changed=folded > 0, stats={"folded": folded})


class M(torch.nn.Module):
    def forward(self, x):
        return -(-x) * 2


out = fxopt.PassManager("fold-double-neg,dce").run(fxopt.trace(M(), (torch.randn(4),)))
assert out.records[0].stats == {"folded": 1}
