"""Applications built on the round engine: ``insitu simulate`` (one machine, every hospital in-process).

Nothing in :mod:`insitu.federation` imports from here; a test walks the imports to keep it so.
"""
