"""Built-in reward models, one file each (aesthetic, CLIP, OCR, audio-video sync, ...), and the reward registry.

Installed as a top-level package beside ``diffrl``. Reward files import their heavy dependencies inside their
``build`` factory, so ``import rewards`` stays cheap. The registry and the built-in rewards arrive with the
rewards issue; this package exists now so the installed layout is final.
"""
