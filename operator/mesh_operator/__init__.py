"""mesh: pool the GPUs of a Kubernetes cluster for llama.cpp inference."""

__version__ = "0.1.0"
