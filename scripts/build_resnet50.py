"""Build the ResNet-50 benchmark model: standard architecture, random weights, plain PyTorch.

No torchvision and no download: the architecture (v1.5 bottlenecks, [3, 4, 6, 3]) is written
out here. Input ``image``: UINT8 [N, 224, 224, 3] (NHWC, as images arrive); conversion to
float NCHW and ImageNet normalisation are folded into the graph. Output ``logits``: FP32
[N, 1000]. Random weights are fine for speed; accuracy claims use the trained demo model.

Writes CACHE/resnet50.onnx and CACHE/resnet50-int8.onnx (static INT8, QDQ, per-channel,
calibrated on random images). Needs torch (CPU): ``pip install torch==2.13.0``.

    python scripts/build_resnet50.py --out ~/.cache/ppml-serve
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ppml_serve.engines.quantize import quantize_bytes


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        layers: list[nn.Module] = []
        inplanes = 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if index == 0 else 1))
                inplanes = planes * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "ppml-serve")
    parser.add_argument("--calibration-images", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = ResNet50().eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 224, 224, 3, dtype=torch.uint8),), buffer,
                          dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    fp32 = buffer.getvalue()
    (args.out / "resnet50.onnx").write_bytes(fp32)
    print(f"wrote {args.out / 'resnet50.onnx'} ({len(fp32) / 1e6:.0f} MB)")
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (args.calibration_images, 224, 224, 3), dtype=np.uint8)
    int8 = quantize_bytes(fp32, calibration, "image", batch_size=8)
    (args.out / "resnet50-int8.onnx").write_bytes(int8)
    print(f"wrote {args.out / 'resnet50-int8.onnx'} ({len(int8) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
