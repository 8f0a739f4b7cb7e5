"""TF-Slim-exact ResNets in JAX/Flax with a fully controllable BatchNorm."""
