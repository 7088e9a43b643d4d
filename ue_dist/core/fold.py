"""Batch norm folded into the convolution before it, for the passes that run a model in eval mode.

REM's noise (K_u x J x (K_a + 1) input-gradient passes per source-model step), its source
model's PGD-AT examples, EM's and TAP's noise all run the classifier in eval mode, where a batch
norm is a fixed per-channel affine map: ``conv -> bn`` equals one convolution with scaled weights
and a bias. Folding removes every such batch norm's forward and backward, which are
memory-bound passes over the largest activations (on a CPU, a sixth of a ResNet-18
input-gradient pass; ``python -m ue_dist.bench.rem_profile``). The result is the same function
up to float rounding, so the noise it gives is equally strong but not bit-identical to the
unfolded model's.

``BatchNormFolder(model)`` traces the model once (``torch.fx``) and keeps a graph module that
*shares* every module with ``model`` except the folded convolutions; ``folder()`` recomputes the
folded weights from the model's current weights and running statistics (a few element-wise
products over the weights: cheap next to one pass, so it can run at every training step) and
returns the graph module. A model that does not trace, or has nothing to fold, is returned as it
is. The folded module must only be used while the batch norms it folded are in eval mode: a
folded batch norm in training mode is refused (its batch statistics cannot be folded).
Pure torch (no ray).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormFolder:
    """An eval-mode view of ``model`` with each ``conv -> batch norm`` pair as one convolution."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: list[tuple[str, str]] = []  # (conv, batch norm) names in ``model``
        self.module: nn.Module = model
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception:  # noqa: BLE001 -- untraceable control flow: run the model unfolded
            return
        modules = dict(model.named_modules())
        for node in list(graph.nodes):
            if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
                continue
            source = node.args[0] if node.args else None
            if not (isinstance(source, fx.Node) and source.op == "call_module"
                    and isinstance(modules.get(source.target), _CONVS)
                    and len(source.users) == 1 and len(node.args) == 1 and not node.kwargs):
                continue
            bn = modules[node.target]
            if not bn.track_running_stats or bn.running_mean is None:
                continue  # no running statistics: nothing fixed to fold
            self.pairs.append((source.target, node.target))
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        if not self.pairs:
            return
        graph.lint()
        # shares model's submodules (GraphModule copies attribute references, not modules)
        folded = fx.GraphModule(model, graph)
        for conv_name, _ in self.pairs:
            conv = modules[conv_name]
            twin = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, conv.groups, bias=True,
                              padding_mode=conv.padding_mode,
                              device=conv.weight.device, dtype=conv.weight.dtype)
            twin.requires_grad_(False)
            twin.weight.data = torch.empty_like(conv.weight)  # keeps channels_last
            parent, _, field = conv_name.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, field, twin)
        self.module = folded

    def __call__(self) -> nn.Module:
        """The folded module with weights recomputed from the model's current state."""
        if not self.pairs:
            return self.model
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for conv_name, bn_name in self.pairs:
                conv, bn = modules[conv_name], modules[bn_name]
                if bn.training:
                    raise RuntimeError(f"batch norm {bn_name!r} is in training mode: its batch "
                                       f"statistics cannot be folded into {conv_name!r}")
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                    bn.running_var, bn.eps, bn.weight, bn.bias)
                twin = self.module.get_submodule(conv_name)
                twin.weight.copy_(weight)
                twin.bias.copy_(bias)
        return self.module


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode) with its ``conv -> batch norm`` pairs folded, once."""
    return BatchNormFolder(model.eval())()


def folded_views(enabled: bool = True) -> Callable[[nn.Module], nn.Module]:
    """``view(model)``: the folded module of ``model`` with current weights, traced once per
    model and refreshed at each call (a training loop's eval-mode passes: REM's noise, PGD-AT's
    attack); ``enabled=False`` gives the model itself."""
    folders: dict[int, BatchNormFolder] = {}

    def view(model: nn.Module) -> nn.Module:
        if not enabled:
            return model
        if id(model) not in folders:
            folders.clear()  # one model per training loop
            folders[id(model)] = BatchNormFolder(model)
        return folders[id(model)]()

    return view
