"""The job and its record: model and types, the Redis record and its fencing, views, dead letters.

May import only worker/'s root (settings, errors, clock); every other room reads jobs from here.
"""
