"""``MoELoRAConv``: a frozen ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` plus a routed
mixture of LoRA experts, one token per output position.

    y[n, :, p] = conv(x)[n, :, p] + s * sum_j w[n,p,j] * B[e] @ (A[(e)] (*) x)[n, :, p]     (e = e[n,p,j])

x is [N, C_in, *spatial] or, as nn.Conv1d/2d/3d accept, unbatched [C_in, *spatial] (the
output then is that of a batch of one, without the batch dim).

As PEFT's LoRA conv layers: A is a convolution with the base's kernel size, stride,
padding and dilation (and its ``padding_mode``; groups 1), B a 1 x 1 convolution with the
base's groups. Parameters are stored flat, in the layout of :class:`moelora.MoELoRALinear`
over the patch of C_in * prod(kernel) inputs: ``lora_A`` [r, C_in*k] (shared, MoSLD) or
[E, r, C_in*k] (the conv kernel [r, C_in, *kernel] flattened), ``lora_B`` [E, C_out, r/groups]
(PEFT's [C_out, r/groups, 1, ...] kernel squeezed).

The learned router reads, like MoELoRALinear's, the input of each output position: the patch
the kernel sees. Its logits are a convolution of x with ``router.weight`` [E, C_in*k] viewed
as an [E, C_in, *kernel] kernel, with the base's geometry (groups 1), in fp32 (fp64 for fp64
x). For a 1 x 1 kernel that is the per-position input channels.

Computation: a 1 x 1 kernel with stride 1 and no padding is the linear case, and runs as
``moelora.moe_lora`` on x's channels, [N*H*W, C_in] (A, B and the router as MoELoRALinear's).
Otherwise A runs as a convolution, and the routed B step is ``moe_lora`` on the projected
channels (see :mod:`moelora.modules.adapter_base`). Merging (static routing) folds
s*B@A, reshaped to the base kernel, into the base weight; not with groups > 1 (as PEFT).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora.modules.adapter_base import AdapterLayerBase, LayerSettings, layer_settings
from moelora.kernels.launchers import accumulator_dtype
from moelora.ops.backend import without_autocast
from moelora.modules.router import Router

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvGeometry(NamedTuple):
    """What a convolution with the base layer's kernel needs besides its weight."""

    stride: tuple
    padding: Union[tuple, str]
    dilation: tuple
    padding_mode: str
    reversed_padding: tuple  # F.pad's order, for padding modes other than "zeros"

    @classmethod
    def of(cls, conv: nn.Module) -> "ConvGeometry":
        return cls(tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation), conv.padding_mode, tuple(conv._reversed_padding_repeated_twice))

    def conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """``x`` convolved with ``weight`` [C_out, C_in/groups, *kernel] in this geometry."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.reversed_padding, mode=self.padding_mode), 0
        return CONV_FUNCTIONS[weight.dim() - 2](x, weight, None, self.stride, padding, self.dilation, groups)


def is_conv(module: nn.Module) -> bool:
    """nn.Conv1d / 2d / 3d (and subclasses); not transposed convolutions."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


class ConvRouter(Router):
    """A :class:`Router` whose logits are a convolution: ``weight`` [E, C_in*k] is applied to the
    patch of every output position (the kernel [E, C_in, *kernel], the base's geometry)."""

    def __init__(self, *args, kernel_size: tuple, in_channels: int, geometry: ConvGeometry, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel_size, self.in_channels, self.geometry = tuple(kernel_size), in_channels, geometry

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, *spatial] -> logits [N * prod(out spatial), E] (positions in order) in fp32
        (fp64 for fp64 x), as :meth:`Router.logits`, with its jitter noise."""
        x = x.to(accumulator_dtype(x.dtype))
        if self.jitters:
            x = x * self.jitter_factors(x).to(x.dtype)
        kernel = self.weight.to(x.dtype).reshape(self.out_features, self.in_channels, *self.kernel_size)
        with without_autocast(x):  # fp32 under torch.autocast too
            return self.geometry.conv(x, kernel).movedim(1, -1).reshape(-1, self.out_features)


class MoELoRAConv(AdapterLayerBase):
    """A frozen ``nn.Conv1d/2d/3d`` with E LoRA experts; arguments as :class:`moelora.MoELoRALinear`
    (see the module docstring; DoRA is not supported; r must be a multiple of the base's groups)."""

    def __init__(self, base_layer: nn.Module, settings: Optional[LayerSettings] = None, **kwargs):
        if not is_conv(base_layer):
            raise TypeError(f"MoELoRAConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d layers, got "
                            f"{type(base_layer).__name__}")
        groups, kernel_size = base_layer.groups, tuple(base_layer.kernel_size)
        patch = base_layer.in_channels * math.prod(kernel_size)
        geometry = ConvGeometry.of(base_layer)
        settings = layer_settings(settings, kwargs)
        super().__init__(base_layer, settings, a_in=patch, d_out=base_layer.out_channels,
                         router_in=patch, b_groups=groups, router_class=ConvRouter,
                         router_kwargs=dict(kernel_size=kernel_size, in_channels=base_layer.in_channels,
                                            geometry=geometry))
        self.in_features, self.out_features = patch, base_layer.out_channels
        self.kernel_size, self.geometry = kernel_size, geometry
        # the base's geometry under nn.ConvNd's names, which model code reads through the adapter layer (Whisper's
        # encoder: conv1.stride[0])
        self.stride, self.padding, self.dilation, self.padding_mode = (geometry.stride, geometry.padding,
                                                                       geometry.dilation, geometry.padding_mode)
        self.lora_dropout = nn.Dropout(settings.lora_dropout) if settings.lora_dropout > 0 else nn.Identity()
        unpadded = geometry.padding == "valid" or (not isinstance(geometry.padding, str)
                                                   and not any(geometry.padding))
        self.pointwise = all(k == 1 for k in kernel_size) and all(s == 1 for s in geometry.stride) and unpadded

    def _add_parameters(self, factory: dict) -> None:
        """No parameters: the channel counts and groups the group mask (a constant buffer) is built from."""
        self.in_channels, self.out_channels, self.groups = (self.base_layer.in_channels, self.base_layer.out_channels,
                                                            self.base_layer.groups)

    def _constant_buffers(self) -> dict:
        constants = super()._constant_buffers()
        if self.groups > 1:
            constants["lora_b_group_mask"] = self._group_mask
        return constants

    def _group_mask(self, device, dtype) -> torch.Tensor:
        """B [E, C_out, r/g] acts as the block-diagonal [E, C_out, r]: output channel o reads the r/g
        projected channels of its group (mask [C_out, r])."""
        out_group = torch.arange(self.out_channels, device=device) // (self.out_channels // self.groups)
        rank_group = torch.arange(self.r, device=device) // (self.r // self.groups)
        return (out_group[:, None] == rank_group[None, :]).to(dtype)

    def base_weight(self) -> torch.Tensor:
        """The base kernel as [C_out, C_in/groups * prod(kernel)]: a view of a contiguous kernel, a
        copy of a channels_last one (merging writes through :meth:`_store_base_weight`)."""
        return self.base_layer.weight.reshape(self.out_channels, -1)

    def _store_base_weight(self, value: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_(value.reshape(weight.shape))  # in place: the kernel keeps its memory format

    def full_lora_B(self) -> torch.Tensor:
        """B as [E, C_out, r] (block-diagonal over the groups when groups > 1)."""
        if self.groups == 1:
            return self.lora_B
        return self.lora_B.repeat(1, 1, self.groups) * self.constant_in(self.lora_b_group_mask, self.lora_B.dtype)

    def check_merge(self, task=None) -> None:
        if self.groups > 1:
            raise ValueError("merging is not supported for convolutions with groups > 1 (as PEFT): the LoRA "
                             "delta of a grouped convolution is not a grouped kernel")
        super().check_merge(task)

    weight_function = ("the convolution of x with its weight, as nn.Conv1d/2d/3d (a weight-standardised one, timm's "
                       "StdConv2d, convolves with its standardised weight)")

    def forward_is_weight_function(self, base: nn.Module) -> bool:
        """Whether ``base``'s forward is nn.Conv1d/2d/3d's (a subclass may override it: timm's StdConv2d
        standardises the weight first)."""
        return type(base).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        unbatched = x.dim() == len(self.kernel_size) + 1  # [C_in, *spatial], as nn.Conv1d/2d/3d accept
        if unbatched:  # the adapter runs on a batch of one
            x, result = x.unsqueeze(0), result.unsqueeze(0)
        lead = (result.shape[0],) + tuple(result.shape[2:])  # N, *output spatial
        dtype = self.lora_B.dtype
        x_cast = x.to(dtype)
        # The router reads x in its accumulator dtype (ConvRouter.logits): the LoRA branch's copy where that is
        # the same, so that one copy of a half-precision x is made and saved for backward, not two.
        routing = self.compute_routing(x_cast if x_cast.dtype == accumulator_dtype(x.dtype) else x, lead)
        x_lora = self.lora_dropout(x_cast)
        (lora_a, a_scale), lora_b = self._effective_A(), self.full_lora_B()
        scaling = self.scaling * a_scale
        base_out = result.to(dtype).movedim(1, -1)
        if self.pointwise:
            self._check_positions(x.shape[2:], result)
            out = self.routed_moe_lora(x_lora.movedim(1, -1), lora_a, lora_b, routing, scaling, base_out)
        else:
            kernel = lora_a.reshape(-1, self.in_channels, *self.kernel_size)  # [(E*)r, C_in, *kernel]
            h = self.geometry.conv(x_lora, kernel).movedim(1, -1)
            self._check_positions(h.shape[1:-1], result)
            out = self._lora_on_projection(h, routing, base_out, lora_b, scaling)
        out = out.movedim(-1, 1)  # [N, *spatial, C] in memory: channels_last strides
        # the base output's layout: NCHW, or channels_last as the base conv gives for a channels_last batch
        out = (out.contiguous() if result.is_contiguous() else out).to(result.dtype)
        return out.squeeze(0) if unbatched else out

    def _check_positions(self, positions, result: torch.Tensor) -> None:
        """ValueError unless the adapter's output positions (``positions``: those of a convolution of x in the
        base's geometry) are the base output's: a base that pads or crops x in its own forward (a causal
        convolution, timm's Conv2dSame) has other positions than its attributes say."""
        if tuple(positions) != tuple(result.shape[2:]):
            raise ValueError(
                f"the base layer {type(self.base_layer).__name__} returned outputs at positions "
                f"{tuple(result.shape[2:])}, but a convolution of its input with its kernel_size, stride, padding "
                f"and dilation gives {tuple(positions)}: its forward pads or crops the input itself (a causal or "
                "dynamically 'same'-padded convolution, as timm's Conv2dSame), so the adapter, which convolves in "
                "the geometry the layer's attributes give, cannot follow it; adapt another layer")

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
                f"groups={self.groups}, {super().extra_repr()}")
