"""The steps of a patch execution, one module each, in the order of the pipeline:

plan → backup → transform → validate (+ report) → commit → verify; restore and purge after.
``locks``, ``result`` and ``apply`` are the parts several steps share (table locks; the
would-be result and its invariants; writing staged changes to live tables). Every step imports
only ``patch_ops.execution`` and the layers below it, and the shared parts.
"""
