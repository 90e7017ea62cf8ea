"""PSEdit core: the method as small, host-free functions (no ComfyUI import anywhere in this package).

Modules: :mod:`.schedule` (sigmas, step windows), :mod:`.inversion` (DDIM inversion and sampling),
:mod:`.guidance` (CFG and triple guidance), :mod:`.perceptual` (Tweedie, perceptual guidance),
:mod:`.lpips_loader` (offline LPIPS), :mod:`.metrics` (PSNR, LPIPS, CLIP scores), :mod:`.analytic`
(closed-form Gaussian models for tests).
"""

__version__ = "0.1.0"
