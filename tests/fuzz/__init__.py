"""Fuzzing suites: protocol decoders, manifests, a live daemon.

CI runs every property with a few examples (``NRM_FUZZ_EXAMPLES``, small
default); ``make fuzz`` runs the same properties with many more, plus the
atheris harness when atheris is installed.
"""
