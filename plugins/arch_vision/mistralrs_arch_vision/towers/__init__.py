"""Vision encoders shared by the families (CLIP ViT, ...)."""
