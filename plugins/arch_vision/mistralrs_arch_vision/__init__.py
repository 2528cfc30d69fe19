"""Vision families (image + text -> text) for mistralrs for Python: image inputs, the
vision pipeline, the ``Which.VisionPlain`` loader and the families built on them."""
