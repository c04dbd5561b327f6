"""A small fast CNN for tests and quick experiments (GAP head, so CAM applies)."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-bn-relu x4 with two max-pools (stride 4 overall), global average pool, linear.

    ``features`` ends with the last conv block (the default target layer); ``fc`` is the head.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(3, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            *_block(4 * w, 4 * w),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def smallcnn(num_classes: int = 10, weights=None, **kw) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, **kw)
