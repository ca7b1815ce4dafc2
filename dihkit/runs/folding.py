"""Batch norms folded into the convolutions that feed them, for frozen models that only run inference.

In eval mode a batch norm after a convolution is an affine map per channel, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass over
the activations fewer per pair. A pair is folded only when the model's own dataflow shows it: torch.fx
traces the forward (``features=True`` for registry models, so every stage output the cohort reads is a
graph output) and a convolution qualifies when its output goes to one batch norm and nowhere else. A
batch norm before a convolution (pre-activation blocks) or after a sum is left alone. A module fx cannot
trace is folded child by child, each child traced on its own.
"""
import copy
import inspect
from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def traced_graph(module: nn.Module) -> fx.Graph | None:
    """The fx graph of ``module``'s forward (``features=True`` when it takes that flag); None when fx cannot
    trace it (no forward, or Python that needs real values, such as unpacking a shape)."""
    if type(module).forward is nn.Module.forward:
        return None
    concrete = {"features": True} if "features" in inspect.signature(module.forward).parameters else None
    try:
        return fx.Tracer().trace(module, concrete_args=concrete)
    except Exception:  # fx raises many kinds (TraceError, TypeError, RuntimeError): any means "no graph"
        return None


def foldable(conv, bn) -> bool:
    """Whether ``bn`` after ``conv`` is a fixed per-channel affine map that the fusion utility folds."""
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not conv.training
            and not bn.training and bn.running_mean is not None and bn.num_features == conv.out_channels)


def conv_bn_pairs(module: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(convolution, batch norm) submodule names where the convolution's output feeds that batch norm only,
    each module called once in the forward (a shared module would change elsewhere too)."""
    nodes = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in nodes)
    pairs = []
    for node in nodes:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,) or users[0].kwargs:
            continue
        conv_name, bn_name = node.target, users[0].target
        if calls[conv_name] == calls[bn_name] == 1 and foldable(module.get_submodule(conv_name),
                                                                 module.get_submodule(bn_name)):
            pairs.append((conv_name, bn_name))
    return pairs


def fold_in_place(module: nn.Module) -> int:
    """Fold every qualifying pair of ``module`` (frozen, eval mode) in place; returns how many were folded."""
    graph = traced_graph(module)
    if graph is None:
        return sum(fold_in_place(child) for child in module.children())
    pairs = conv_bn_pairs(module, graph)
    for conv_name, bn_name in pairs:
        replace(module, conv_name, fuse_conv_bn_eval(module.get_submodule(conv_name), module.get_submodule(bn_name)))
        replace(module, bn_name, nn.Identity())
    return len(pairs)


def replace(module: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``module``'s submodule at the dotted path ``name`` (any torch this toolkit runs on)."""
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent), child, new)


def folded(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of the frozen ``module`` with its batch norms folded (``module`` itself is left as it was), and
    how many were folded."""
    copy_ = copy.deepcopy(module)
    return copy_, fold_in_place(copy_)
