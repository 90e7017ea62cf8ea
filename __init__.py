"""PSEdit: faithful text-guided editing of real photos (ComfyUI entry point).

ComfyUI imports this file; the nodes (and with them ComfyUI's own modules) are imported only when ComfyUI asks
for the extension, so ``psedit_core`` stays importable without ComfyUI. Inside a ComfyUI older than the oldest one
PSEdit supports, the import stops at once with a message naming the version needed (ComfyUI shows it in its log as
the reason the pack did not load), instead of failing somewhere inside a node.
"""

import re
import sys

MIN_COMFYUI = "0.3.64"  # the oldest ComfyUI PSEdit is tested on (README, pyproject's requires-comfyui)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_comfyui(version: str | None) -> None:
    """Raise ``ImportError`` naming the version needed when ``version`` (ComfyUI's ``comfyui_version.__version__``;
    None where the file does not exist, i.e. before 0.3.x) is older than :data:`MIN_COMFYUI`."""
    if version is not None and _version_key(version) >= _version_key(MIN_COMFYUI):
        return
    raise ImportError(
        f"PSEdit needs ComfyUI {MIN_COMFYUI} or later, this ComfyUI is {version or 'older than 0.3'}: update ComfyUI "
        "(ComfyUI-Manager: Update ComfyUI; or git pull and pip install -r requirements.txt in the ComfyUI folder)"
    )


def _host_version() -> str | None:
    try:
        import comfyui_version
    except ImportError:
        return None
    return getattr(comfyui_version, "__version__", None)


if "folder_paths" in sys.modules:  # imported by ComfyUI as a custom node pack
    check_comfyui(_host_version())


async def comfy_entrypoint():
    from .nodes import PSEditExtension

    return PSEditExtension()
