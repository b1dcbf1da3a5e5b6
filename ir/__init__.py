"""fxopt's graph IR: tracing, the Graph, metadata, verification, printing,
serialization and fxopt's own ops."""

from . import ops  # registers fxopt ops with torch.library
from . import ops_quant  # noqa: F401  quantized linear ops
from . import ops_quant_static  # noqa: F401  static W8A8 linear
from . import ops_quant_embedding  # noqa: F401  4/8-bit embedding tables
from . import ops_fused  # noqa: F401  rms_norm, add_rms_norm, add_layer_norm
from . import ops_quant_fused  # noqa: F401  quantized linear + activation
from . import ops_attention  # noqa: F401  SDPA -> com.microsoft attention lowering
from . import ops_padding  # noqa: F401  padding_index, unpad, pad (remove-padding)
from . import ops_codebook  # noqa: F401  codebook_weight (cluster)
from . import ops_experts  # noqa: F401  experts_swiglu (fuse-experts)
from .graph import Graph
from .meta import MetaError, propagate_meta
from .serialize import LoadError
from .parity import Parity, ParityError, assert_parity, compare, row_cosines
from .trace import TraceError, trace
from .verify import DOCUMENTED_OP_SET, VerificationError, verify

load = Graph.load

__all__ = [
    "Graph", "trace", "load", "verify", "compare", "row_cosines", "assert_parity", "Parity", "ParityError",
    "TraceError", "VerificationError", "MetaError", "LoadError", "propagate_meta", "ops", "DOCUMENTED_OP_SET",
]
