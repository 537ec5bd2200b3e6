"""Pyramid inside a serving engine: the lower stages of a chain as vLLM's speculative proposer
(``serving.proposer``) and vLLM's OpenAI-compatible server started with it (``serving.server``).
Nothing here imports vLLM: the proposer is handed vLLM's objects, and the server runs in the
environment that has vLLM."""
