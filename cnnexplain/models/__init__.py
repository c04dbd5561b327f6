"""Models: backbone registry, layer access and splitting, checkpoints, class-specific gates."""
