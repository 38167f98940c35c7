"""Triton kernels with their PyTorch references (installed as `mimic_engine.kernels`).

Keep this file free of imports and of a `__version__`: transformers probes for a PyPI package named
`kernels` by importing whatever `import kernels` finds, which is this folder when the repository
root is on sys.path.
"""
