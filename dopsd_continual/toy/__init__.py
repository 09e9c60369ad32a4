"""The embedded toy-shapes world, model, scorer and training scripts."""
