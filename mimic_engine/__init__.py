"""mimic-engine: universal multimodal retrieval with MiMIC (fusion-in-decoder).

Importing the package is light: torch, transformers and optional packages are imported by the
modules that use them.
"""
__version__ = "0.1.0"
