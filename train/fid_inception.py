"""The Inception-v3 network FID is defined on (Heusel et al. 2017), in plain PyTorch, for the standard weights file.

FID is not "Inception features" in general but the features of one network: TensorFlow's
`inception-2015-12-05` graph (the pool_3 layer, 2048 values), fed with images resized to 299 x 299 by
TensorFlow 1's bilinear resize and scaled to [-1, 1]. pytorch-fid, torch-fidelity and torchmetrics (which
uses torch-fidelity's network) all load the same converted weights file,

    weights-inception-2015-12-05-6726825d.pth   (torch-fidelity, torchmetrics)
    pt_inception-2015-12-05-6726825d.pth        (pytorch-fid; the same tensors)

into a torchvision-style Inception-v3 patched to match the TensorFlow graph. Those packages need
torchvision, which has no CPU build for this project's torch in the package registry (the CUDA build
there fails to import next to the CPU torch), so this file holds the network itself: the same layer
names, so the standard file loads with strict=True, and the same forward as torch-fidelity's
FeatureExtractorInceptionV3 (its "2048" feature): on shared random weights both give bit-identical features
on a CPU (checked against torch-fidelity 0.4.0, 64 to 512 px inputs). Only the architecture is here; the weights always
come from that file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURES = 2048


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's epsilon 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, that (as TensorFlow's) leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d, 35 x 35
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17 x 17, factorised 7x7 convolutions
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):  # Mixed_7b, 7c, 8 x 8, split 1x3 / 3x1 branches
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the TensorFlow graph max-pools in Mixed_7c's pool branch (7b averages)
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's `resize_bilinear(align_corners=False)`, the resize inside the FID graph: output pixel i
    samples the input at i * in/out (no half-pixel offset, unlike torch's bilinear), blending the two
    neighbours and repeating the last row/column at the edge. No antialiasing."""

    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        length = x.shape[dim]
        # positions in float32 as the graph computes them: float64 would move some samples by up to 0.01 levels
        position = torch.arange(size, dtype=torch.float32) * torch.tensor(length / size, dtype=torch.float32)
        low = position.long()
        high = (low + 1).clamp(max=length - 1)
        shape = [1] * x.dim()
        shape[dim] = size
        weight = (position - low.float()).view(shape)
        a, b = x.index_select(dim, low), x.index_select(dim, high)
        return a + (b - a) * weight

    return along(along(images, 3), 2)  # across the width, then the height


class FIDInceptionV3(nn.Module):
    """uint8 images (N, 3, H, W) of any size -> pool_3 features (N, 2048), as FID defines them."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)  # the classifier (1008 classes): in the weights file, not used by FID

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 takes uint8 images (N, 3, H, W); got {images.dtype} {tuple(images.shape)}.")
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # pool_3: global average pool, 2048 features


class InceptionWeightsError(ValueError):
    """The FID Inception weights file is missing or is not that file. The message says how to get it."""


def how_to_get_weights(path: Path) -> str:
    return (
        f"Download the FID Inception weights ({WEIGHTS_NAMES[0]}, about 96 MB) where you have network, e.g. "
        f"`mkdir -p {path.parent} && curl -L -o {path} {WEIGHTS_URL}` (the file torchmetrics and torch-fidelity "
        f"download; pytorch-fid's {WEIGHTS_NAMES[1]} holds the same tensors), and pass it with "
        f"--inception_weights FILE or put it at {path}."
    )


def default_weights_path() -> Path:
    """Where torch.hub (torchmetrics, torch-fidelity, pytorch-fid) caches the file: the first of its two names
    that exists there, else the torch-fidelity name."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), folder / WEIGHTS_NAMES[0])


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """The network with the weights file at `path`, in eval mode; InceptionWeightsError when the file is
    missing, unreadable or holds other tensors (e.g. torchvision's ImageNet Inception)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(f"FID Inception weights not found at {path}. {how_to_get_weights(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated download, not a torch file, a pickle with code
        raise InceptionWeightsError(f"{path} could not be read as a torch state dict ({type(err).__name__}: {err}). {how_to_get_weights(path)}") from None
    network = FIDInceptionV3()
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InceptionWeightsError(f"{path} is not the FID Inception weights file ({first}). {how_to_get_weights(path)}") from None
    return network.eval().requires_grad_(False)
