"""The FLUX.1 autoencoder that BAGEL uses to move between pixels and latents (spec sections 2.3, 5.2, 5.6).

Module and parameter names mirror the official `modeling/autoencoder.py` (itself FLUX's), so the
state_dict keys equal the keys of `ae.safetensors` exactly and loading needs no renaming table.
The reference runs this model in fp32 on the CPU (spec 11.13); nothing here casts to bf16.

Geometry comes from a `VAEConfig`: the encoder has `len(ch_mult)` levels of `num_res_blocks`
ResnetBlocks (a Downsample after every level but the last), the decoder mirrors it with one extra
ResnetBlock per level and an Upsample on every level but level 0. Only the mid blocks attend.

The GroupNorms (with the swish that follows most of them) go through `kernels.group_norm`:
Triton kernels on a GPU, PyTorch's own ops (the official numerics) on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_ray.model.config import VAEConfig
from bagel_ray.model.kernels.group_norm import group_norm

_GROUPS = 32
_EPS = 1e-6


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=_EPS, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hidden = group_norm(x, self.norm)

        def to_seq(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2).contiguous()

        out = F.scaled_dot_product_attention(to_seq(self.q(hidden)), to_seq(self.k(hidden)), to_seq(self.v(hidden)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    """`x + conv2(swish(GN(conv1(swish(GN(x))))))`; a 1x1 `nin_shortcut` maps x when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # Only present when the width changes, so the key set matches the checkpoint.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(group_norm(x, self.norm1, then_swish=True))
        h = self.conv2(group_norm(h, self.norm2, then_swish=True))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding
    (asymmetric, as in the official code; a symmetric padding=1 conv gives different numbers)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (keys `mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder level (keys `down.{i}.block.{j}`, `down.{i}.downsample`)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level (keys `up.{i}.block.{j}`, `up.{i}.upsample`)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> moments [B, 2*z, H/8, W/8] (mean channels first, then logvar)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        last = len(ch_mult) - 1
        self.down = nn.ModuleList(
            DownLevel(ch * in_mult[i], ch * ch_mult[i], num_res_blocks, downsample=i != last) for i in range(len(ch_mult))
        )
        width = ch * ch_mult[-1]
        self.mid = MidBlock(width)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(group_norm(h, self.norm_out, then_swish=True))


class Decoder(nn.Module):
    """Unscaled latent [B, z, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped).

    `up` is indexed by level like the checkpoint (`up.0` is the full-resolution level) but is
    run from the last level down to level 0.
    """

    def __init__(self, out_ch: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(width)
        # Level i reads the width of level i+1 (the one run before it); the last level reads the mid width.
        in_widths = [ch * m for m in ch_mult[1:]] + [width]
        self.up = nn.ModuleList(
            UpLevel(in_widths[i], ch * ch_mult[i], num_res_blocks + 1, upsample=i != 0) for i in range(len(ch_mult))
        )
        self.norm_out = _group_norm(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(group_norm(h, self.norm_out, then_swish=True))


class AutoEncoder(nn.Module):
    """FLUX autoencoder with BAGEL's latent scaling `z' = scale*(z - shift)` and its inverse."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.scale_factor = config.scale_factor
        self.shift_factor = config.shift_factor
        self.encoder = Encoder(config.in_channels, config.ch, config.ch_mult, config.num_res_blocks, config.z_channels)
        self.decoder = Decoder(config.out_ch, config.ch, config.ch_mult, config.num_res_blocks, config.z_channels)

    def encode_moments(self, x: Tensor) -> Tensor:
        """Encoder output [B, 2*z, H/8, W/8]: the posterior's mean (first z channels) and logvar (last z)."""
        return self.encoder(x)

    def encode(self, x: Tensor, eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latent of an image in [-1, 1], from a posterior SAMPLE (not its mean), as the reference does.

        `eps` injects the standard-normal draw. Without it the draw is made on the CPU (with
        `generator`, or the global CPU generator when None) and then moved: the reference runs the
        VAE on the CPU, so its `randn_like` consumes the CPU stream before the initial noise is
        drawn (spec 11.8), and drawing on the CPU keeps that order wherever this model lives.
        """
        mean, logvar = torch.chunk(self.encode_moments(x), 2, dim=1)
        if eps is None:
            eps = self.posterior_draw(tuple(mean.shape), mean.dtype, generator).to(mean.device)
        elif eps.shape != mean.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, the posterior mean has {tuple(mean.shape)}")
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.scale_factor * (z - self.shift_factor)

    def posterior_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The posterior's shape [1, z, H/8, W/8] for one image of `height` x `width` pixels."""
        down = self.config.downsample
        return (1, self.config.z_channels, height // down, width // down)

    @staticmethod
    def posterior_draw(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
        """The posterior sample's standard-normal draw, on the CPU. One place for it: a stage
        that did not encode the image draws it again to bring the request's generator to where
        the initial noise is drawn (spec 11.8). It takes one 32-bit value of the generator per
        element in float32, bfloat16 and float16 alike, so stages of other dtypes agree."""
        return torch.randn(shape, generator=generator, dtype=dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Raw image [B, 3, 8h, 8w] (roughly [-1, 1], unclamped) of a scaled latent [B, z, h, w]."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def load_vae(
    path: str | Path,
    config: VAEConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """Build an `AutoEncoder` on the meta device and assign the tensors of `ae.safetensors` to it.

    The file is opened memory-mapped and every tensor is moved once, straight to `device`/`dtype`,
    so weights are never allocated twice. The key set and every shape must equal the model's;
    anything else raises a `ValueError` that names the offending key, since a silently partial
    VAE would decode garbage rather than fail.
    """
    from safetensors import safe_open

    path = Path(path)
    with torch.device("meta"):
        model = AutoEncoder(config)
    expected = model.state_dict()

    state: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise ValueError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all: {missing[:5]})")
        unexpected = sorted(keys - set(expected))
        if unexpected:
            raise ValueError(
                f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all: {unexpected[:5]})"
            )
        for name, want in expected.items():
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(want.shape):
                raise ValueError(f"{path}: key {name!r} has shape {shape}, the model expects {tuple(want.shape)}")
            state[name] = f.get_tensor(name).to(device=device, dtype=dtype)

    model.load_state_dict(state, strict=True, assign=True)
    # Inference only: no autograd bookkeeping on the weights.
    return model.requires_grad_(False).eval()
