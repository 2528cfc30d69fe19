"""Image processors shared by the families: Pillow + torch, no torchvision."""
