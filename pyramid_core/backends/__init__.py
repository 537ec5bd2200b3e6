"""Model backends: adapters that make a framework's models pipeline stages.

``backends.hf`` is the only package that imports ``transformers``; the core imports no backend.
"""
