"""Storage: where artifacts and trace files live. `objectstore` holds the protocol, its errors,
the key rules and the local (directory) store; `s3` the S3-compatible store; `factory` chooses
one by URL (`open_store`). Nothing is imported here, so boto3 loads only where S3 is configured."""

# The modules other rooms may import (tests/test_layout.py holds the rest of the product to them);
# the S3 store is opened by the factory only.
__all__ = ["factory", "objectstore"]
