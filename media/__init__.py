"""Media stages' work: frames in the spool, encoding, thumbnails, file checks, storage.

Nothing here imports torch: the media worker stays small.
"""
