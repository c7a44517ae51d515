"""A user's own model for tests/flows/test_bring_your_own.py: a factory whose forward takes ``pixel_values``
and which asks for no feature count."""

from torch import nn


class PixelNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, pixel_values):
        return self.head(self.body(pixel_values))


def pixel_net(num_classes: int, width: int = 16) -> nn.Module:
    return PixelNet(num_classes, width)


def table_net(num_features: int, num_classes: int) -> nn.Module:
    """A factory for table data, called with the data's shapes because its signature names them."""
    return nn.Sequential(nn.Linear(num_features, 32), nn.ReLU(), nn.Linear(32, num_classes))


class FixedWidthNet(nn.Module):
    """Reshapes its hidden layer with widths it hard-codes, as attention blocks do with their head count:
    a model that pruning its hidden layer breaks (its forward then raises), where factorizing it does not."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(num_features, 32), nn.Linear(32, num_classes)

    def forward(self, x):
        hidden = self.fc1(x).relu().view(-1, 4, 8)
        return self.fc2(hidden.flatten(1))


def fixed_width_net(num_features: int, num_classes: int) -> nn.Module:
    return FixedWidthNet(num_features, num_classes)
