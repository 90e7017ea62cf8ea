"""PSEdit: faithful text-guided editing of real photos (ComfyUI entry point).

ComfyUI imports this file; the nodes (and with them ComfyUI's own modules) are imported only when ComfyUI asks
for the extension, so ``psedit_core`` stays importable without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import PSEditExtension

    return PSEditExtension()
