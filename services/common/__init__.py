"""Code shared by the services: image decoding, the document schema, scoring and the stores.

This package imports no service.
"""
