"""agpt-jax: continued pretraining of AuroraGPT-style Llama models in JAX/Flax."""

__version__ = "0.1.0"
