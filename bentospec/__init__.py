"""bentospec: vLLM speculative decoding packaged as a BentoML service."""

__version__ = "0.1.0"
