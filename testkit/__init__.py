"""Real local servers and test doubles shared by `tests/` and `benchmarks/`.

A benchmark starts the same throwaway PostgreSQL, SeaweedFS S3 server and OpenAI-compatible
double as the tests, so they live here, importable by both, rather than in `tests/` (which
nothing but pytest imports). Not part of the product: the package is not installed with
sceneref, and pipeline/, scorers/, deployments/ and cluster/ never import it.
"""
