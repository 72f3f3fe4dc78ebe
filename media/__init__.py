"""Media stages' work: reference download and preparation, spool, encoding, thumbnails, storage.

May import only worker/'s root (errors, settings); never torch or a model: the media worker
stays small.
"""
