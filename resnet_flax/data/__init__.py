"""Input pipelines: embedded digits, CIFAR-10, ImageFolder JPEG trees, synthetic."""
