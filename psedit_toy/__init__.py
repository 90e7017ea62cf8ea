"""PSEdit's toy world: captioned scenes with ground truth and a small text-to-image model trained on them.

``scenes`` is pure numpy. ``model`` and ``train`` build ComfyUI objects (MODEL, CLIP, VAE) and need a ComfyUI
checkout on ``sys.path`` (tests and benchmarks put it there from ``COMFYUI_PATH``).
"""
