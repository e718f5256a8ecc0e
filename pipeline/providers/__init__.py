"""Providers: the LLM and image models the generation calls, behind two protocols (`base`).

OpenAI-compatible endpoints (`openai_clients`, with model checks in `modelcheck`), Gemini
(`gemini`), a self-hosted diffusers pipeline (`diffusers`), an offline pair for demos and tests
(`offline`), the shared retry policy (`retry`), and `factory`, which builds the configured pair.
Nothing is imported here, so importing the protocols never loads a vendor SDK or torch.
"""

# The modules other rooms may import (tests/test_layout.py holds the rest of the product to them);
# gemini and modelcheck are built by the factory only.
__all__ = ["base", "diffusers", "factory", "offline", "openai_clients", "retry"]
