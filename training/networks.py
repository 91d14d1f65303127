"""StyleGAN2-style residual discriminator with equalised learning rate.

Weights are stored unscaled (N(0, 1)) and multiplied by 1/sqrt(fan_in) at run
time, so plain Adam sees the same effective step for every layer, as in the
generator.  Blocks halve the resolution from R down to 4 with a 2x2 average
pool (a [1, 1] box filter: the simplest antialiased down-sampling), each with
a 1x1 skip scaled with the residual by sqrt(0.5); the 4x4 epilogue appends a
minibatch standard-deviation channel so D can see a lack of variety.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

GAIN = math.sqrt(2.0)


class EqConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True, act: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * kernel * kernel)
        self.act, self.down, self.pad = act, down, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.scale
        x = F.conv2d(x, w.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None, padding=self.pad)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, 0.2) * GAIN if self.act else x


class EqLinear(nn.Module):
    def __init__(self, cin: int, cout: int, act: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale, self.act = 1 / math.sqrt(cin), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, (self.weight * self.scale).to(x.dtype), self.bias.to(x.dtype))
        return F.leaky_relu(x, 0.2) * GAIN if self.act else x


class DBlock(nn.Module):
    """conv3x3 -> conv3x3 + 2x down, plus a 1x1 down-sampled skip, summed * sqrt(0.5)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0 = EqConv2d(cin, cin, 3)
        self.conv1 = EqConv2d(cin, cout, 3, down=True)
        self.skip = EqConv2d(cin, cout, 1, bias=False, act=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


def minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append the mean (over features) std (over a group of samples) as one channel."""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:  # the group must divide the batch
        g -= 1
    y = x.float().reshape(g, -1, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # [B/g, C, H, W]
    y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class Discriminator(nn.Module):
    """Logits [B] for images [B, 3, R, R] in [-1, 1]."""

    def __init__(self, resolution: int, channel_base: int = 32768, channel_max: int = 512, mbstd_group: int = 4):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
        self.resolution, self.mbstd_group = resolution, mbstd_group

        def ch(res: int) -> int:
            return max(1, min(channel_base // res, channel_max))

        self.fromrgb = EqConv2d(3, ch(resolution), 1)
        self.blocks = nn.ModuleList()
        res = resolution
        while res > 4:
            self.blocks.append(DBlock(ch(res), ch(res // 2)))
            res //= 2
        c = ch(4)
        self.conv = EqConv2d(c + 1, c, 3)
        self.fc = EqLinear(c * 16, c)
        self.out = EqLinear(c, 1, act=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"D expects {self.resolution}x{self.resolution} images, got {list(img.shape)}")
        x = self.fromrgb(img)
        for blk in self.blocks:
            x = blk(x)
        x = self.conv(minibatch_std(x, self.mbstd_group))
        x = self.fc(x.flatten(1))
        return self.out(x).squeeze(1).float()
