"""Train the bundled demo model: a small CNN for scikit-learn's 8x8 handwritten digits.

Input ``image``: UINT8 [N, 8, 8], pixel intensities 0..255 (the dataset's 0..16 scaled up),
so that clients send compact binary payloads; scaling to [0, 1] is folded into the graph.
Output ``probabilities``: FP32 [N, 10].

Writes src/ppml_serve/models/demo.onnx, demo.json (metrics), demo-samples.npz (held-out
images and labels used by the self-check and the tests) and demo-calibration.npy (training
images for INT8 calibration: ``ppml-serve model quantize``).

Needs the ``train`` extra and torch (CPU): ``pip install -e '.[train]' torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "ppml_serve" / "models"


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).unsqueeze(1) / 255.0
        return torch.softmax(self.head(self.features(x)), dim=1)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).unsqueeze(1) / 255.0
        return self.head(self.features(x))


def load_images() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def save_calibration(out_dir: Path, x_train: np.ndarray) -> None:
    """300 training images (never the held-out ones) for INT8 calibration."""
    np.save(out_dir / "demo-calibration.npy", x_train[:300])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--calibration-only", action="store_true",
                        help="only (re)write demo-calibration.npy")
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = load_images()
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels)
    if args.calibration_only:
        save_calibration(args.out_dir, x_train)
        return
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = order[start:start + 64]
            loss = nn.functional.cross_entropy(model.logits(xt[idx]), yt[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())
    print(f"test accuracy: {accuracy:.4f} on {len(y_test)} held-out images")

    buffer = io.BytesIO()
    torch.onnx.export(
        model, (torch.from_numpy(x_test[:1]),), buffer, dynamo=False, opset_version=17,
        input_names=["image"], output_names=["probabilities"],
        dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "demo.onnx").write_bytes(buffer.getvalue())
    np.savez(args.out_dir / "demo-samples.npz", images=x_test, labels=y_test)
    save_calibration(args.out_dir, x_train)
    metrics = {"dataset": "sklearn digits (8x8)", "test_images": len(y_test),
               "test_accuracy": round(accuracy, 4), "epochs": args.epochs, "seed": 0}
    (args.out_dir / "demo.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
