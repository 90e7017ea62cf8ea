"""Screenshot each example workflow in the real ComfyUI frontend: template thumbnails and the README picture.

    COMFYUI_PATH=/path/to/ComfyUI python tools/screenshot_workflows.py [--only ID] [--out DIR]

Starts ComfyUI (``main.py --cpu``, loopback, a free port, offline) with this repository installed as
``custom_nodes/psedit`` in a throw-away base directory (tests/host/comfy_server.py), with an empty stub file for each
checkpoint the workflows name and a photo for each Load Image (Chelsea the cat from scikit-image, CC0, when it is
installed; a plain gradient otherwise). Its frontend (the installed comfyui-frontend-package) is opened in headless
Chromium, driven over the Chrome DevTools protocol (aiohttp, which ComfyUI already needs; no browser is downloaded):
each workflow is fetched from the server's template route and loaded the way the template browser loads it
(``app.loadGraphData``), in focus mode, without minimap, canvas menu, toasts or dialogs, with full-detail rendering at
any zoom, fitted to the graph. It writes

- ``example_workflows/<title>.jpg`` beside ``<title>.json`` (tools/make_workflows.py's TITLES): the template
  browser's thumbnail (square, like ComfyUI's own templates; the card shows it in a 256 px box);
- ``docs/edit_workflow.png``: the edit workflow (psedit_edit_sd15) large, for the README.

``--out DIR`` writes all images to DIR instead (to look at them before replacing the committed ones). Chromium comes
from the system (``apt-get install chromium``; ``--chromium PATH`` or $CHROMIUM otherwise). Rerun whenever a workflow
changes (after tools/make_workflows.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO / "tools"))

from comfy_server import PACK_FOLDER, Server  # noqa: E402
from make_workflows import TITLES, path_of  # noqa: E402

log = logging.getLogger("screenshot_workflows")

WORKFLOWS = REPO / "example_workflows"
# Workflows are named here as the server lists them: by file name without .json (their titles, with spaces and
# parentheses, so every URL quotes them).
README_WORKFLOW = path_of("psedit_edit_sd15").stem
README_IMAGE = REPO / "docs" / "edit_workflow.png"

# Model files the workflows name, by loader node: (models/ subfolder, widget index). Empty stubs let the combos and
# ComfyUI's own validation accept the names; nothing loads them.
MODEL_WIDGETS = {"CheckpointLoaderSimple": ("checkpoints", 0), "VAELoader": ("vae", 0), "UNETLoader":
                 ("diffusion_models", 0), "CLIPLoader": ("text_encoders", 0), "LoraLoader": ("loras", 2)}

# Frontend settings (user/default/comfy.settings.json): no first-run template dialog or release notes, no missing
# model/node dialogs, no minimap, canvas menu, canvas info or selection toolbox; never drop to low-detail rendering
# when zoomed out (0 disables the font-size level-of-detail threshold).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Canvas.SelectionToolbox": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",  # the top bar's tabs stay visible in focus mode
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
    "Comfy.Release.Status": "skipped",
    "Comfy.ColorPalette": "dark",
}
# Toasts, and the button that leaves focus mode (top right).
HIDE_CSS = ".p-toast, .p-toast-message, .comfy-menu-hamburger { display: none !important; }"


@dataclass(frozen=True)
class Shot:
    """One picture: the viewport (CSS px) the graph is fitted into, and the saved image size (px)."""
    path: Path
    viewport: tuple[int, int]
    size: tuple[int, int] | None  # None: the graph's own aspect at viewport[0] width
    fill: float  # fraction of the viewport the graph's bounds fill along the tighter axis
    scale: float = 1.0  # device pixel ratio of the capture
    quality: int = 90


def template_url(name: str, suffix: str) -> str:
    """The server path of a template file of the pack, as the frontend requests it."""
    return f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}{suffix}"


def thumbnail(name: str, out: Path) -> Shot:
    # ComfyUI's own templates use 350-400 px square thumbnails; the card draws a 256 CSS px box (object-contain).
    # 512 px is sharp on 2x screens; the graph is fitted into a square viewport wide enough to draw it in full detail.
    return Shot(out / f"{name}.jpg", viewport=(1400, 1400), size=(512, 512), fill=0.96)


def readme_shot(path: Path) -> Shot:
    return Shot(path, viewport=(2400, 900), size=None, fill=0.97)


# --------------------------------------------------------------------------------------------------------- server


def named_files() -> dict[str, set[str]]:
    """``{models/ subfolder or "input": {file name}}`` of every model file and photo the workflows name."""
    found: dict[str, set[str]] = {}
    for path in sorted(WORKFLOWS.glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            for model in (node.get("properties") or {}).get("models", []):  # e.g. Perceptual Guidance's decoder
                found.setdefault(model["directory"], set()).add(model["name"])
            values = node.get("widgets_values") or []
            if node["type"] == "LoadImage" and values:
                found.setdefault("input", set()).add(values[0])
            elif node["type"] in MODEL_WIDGETS:
                folder, index = MODEL_WIDGETS[node["type"]]
                if len(values) > index and isinstance(values[index], str):
                    found.setdefault(folder, set()).add(values[index])
    return found


def sample_photo() -> Image.Image:
    """Chelsea the cat (scikit-image's sample data, CC0), or a gradient when scikit-image is not installed."""
    try:
        from importlib.resources import files

        return Image.open(io.BytesIO((files("skimage") / "data" / "chelsea.png").read_bytes())).convert("RGB")
    except (ImportError, OSError) as exc:
        log.info("no scikit-image sample photo (%s); Load Image shows a gradient", exc)
        gradient = Image.linear_gradient("L").resize((512, 512))
        return Image.merge("RGB", (gradient, gradient.rotate(90), Image.new("L", (512, 512), 120)))


def prepare_server() -> Server:
    server = Server().prepare()
    photo = sample_photo()
    for folder, names in named_files().items():
        target = server.base / "input" if folder == "input" else server.base / "models" / folder
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            if folder == "input":
                photo.save(target / name)
            else:
                (target / name).write_bytes(b"")
    settings = server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(SETTINGS, indent=1))
    return server


# -------------------------------------------------------------------------------------------------------- browser


def find_chromium(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    raise SystemExit("no Chromium found: apt-get install chromium, or pass --chromium PATH")


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, timeout: float = 60):
        self.profile = Path(tempfile.mkdtemp(prefix="psedit-chromium-"))
        args = [executable, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--force-color-profile=srgb", "--window-size=1400,1400", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.stderr = open(self.profile / "stderr.log", "w")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True)
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self.ws = None
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None
        self.console: list[str] = []

    async def connect(self) -> Browser:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + self.timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Chromium did not start:\n{(self.profile / 'stderr.log').read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        await self.send("Runtime.enable")
        await self.send("Page.enable")
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                params = data["params"]
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                self.console.append(f"{params['type']}: {text}")
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console.append(f"exception: {details.get('exception', {}).get('description', details)}")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("Chromium closed the DevTools connection"))

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        data = await asyncio.wait_for(future, self.timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data["result"]

    async def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"in the page: {details.get('exception', {}).get('description', details['text'])}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float | None = None):
        deadline = time.time() + (timeout or self.timeout)
        while True:
            with contextlib.suppress(RuntimeError):
                value = await self.evaluate(expression)
                if value:
                    return value
            if time.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; browser console:\n" + "\n".join(self.console[-30:]))
            await asyncio.sleep(0.25)

    async def viewport(self, width: int, height: int, scale: float = 1.0) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=scale,
                        mobile=False)

    async def screenshot(self) -> Image.Image:
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------- frontend

FRAMES = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))"
NODES = "(app.graph.nodes ?? app.graph._nodes)"


async def open_frontend(page: Browser, url: str) -> None:
    await page.viewport(1400, 1400)
    await page.send("Page.navigate", url=url)
    # window.app is set when the graph canvas is mounted; the first workflow (blank or default) is loaded after.
    await page.wait_for("!!(window.app?.canvas && window.app?.graph && window.app?.extensionManager?.command)",
                        "the ComfyUI frontend to start", timeout=120)
    version = await page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    log.info("frontend %s is up", version or "(version unknown)")
    await page.evaluate(f"""(() => {{
        const style = document.createElement('style'); style.textContent = {json.dumps(HIDE_CSS)};
        document.head.appendChild(style); return true; }})()""")
    await page.wait_for("!!window.app.extensionManager.workflow?.activeWorkflow", "the startup workflow")
    await asyncio.sleep(1.0)  # let the startup workflow finish loading before ours replaces it
    await close_dialogs(page)
    if not await page.evaluate("!!window.app.extensionManager.focusMode"):
        await page.evaluate("window.app.extensionManager.command.execute('Workspace.ToggleFocusMode').then(() => true)")


async def close_dialogs(page: Browser, expected: bool = False) -> None:
    """Close every open dialog (logging what an unexpected one said): the graph must be all the picture shows."""
    for _ in range(10):
        texts = await page.evaluate("[...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 300))")
        if not texts:
            return
        for text in texts if not expected else ():
            log.warning("closing a dialog: %s", " ".join(text.split()))
        await page.evaluate("""(() => {
            const buttons = document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog [aria-label=Close]');
            buttons.forEach(b => b.click());
            if (!buttons.length) window.app.extensionManager.dialog?.closeDialog?.();
            return true; })()""")
        await asyncio.sleep(0.5)
    raise RuntimeError("a dialog would not close")


async def load_workflow(page: Browser, name: str) -> None:
    """Load ``name`` as the template browser does: fetch from the template route, ``app.loadGraphData``."""
    route = template_url(name, ".json")
    count = await page.evaluate(f"""(async () => {{
        const r = await fetch({json.dumps(route)});
        if (!r.ok) throw new Error('GET {route}: ' + r.status);
        const json = await r.json();
        await window.app.loadGraphData(json, true, true, {json.dumps(name)});
        return {NODES}.length; }})()""")
    log.info("%s: %d nodes loaded", name, count)
    await close_dialogs(page)
    # Load Image previews are fetched from /view after the graph is configured.
    images_ready = f"""{NODES}.filter(n => n.type === 'LoadImage').every(
        n => n.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))"""
    try:
        await page.wait_for(images_ready, "Load Image previews", timeout=30)
    except TimeoutError:
        log.warning("%s: a Load Image preview did not load; the picture shows an empty node", name)


async def missing_models_listed(page: Browser, name: str, timeout: float = 30) -> str:
    """Load ``name`` as the template browser does into a frontend whose missing-models warning is on, and return the
    text of what the frontend lists as missing: the Missing Models dialog (frontend 1.2x, ComfyUI 0.3.x) or the
    Errors panel behind the "View details" of its error toast (1.4x, ComfyUI 0.33)."""
    route = template_url(name, ".json")
    await page.evaluate(f"""(async () => {{
        const r = await fetch({json.dumps(route)});
        if (!r.ok) throw new Error('GET {route}: ' + r.status);
        await window.app.loadGraphData(await r.json(), true, true, {json.dumps(name)});
        return true; }})()""")
    listed = """(() => {
        const details = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'View details');
        if (details) details.click();
        const text = document.body.innerText;
        return text.includes('Missing Models') ? text : ''; })()"""
    await page.wait_for(listed, f"{name}: the frontend's missing-models listing", timeout=timeout)
    await asyncio.sleep(1.0)  # the list fills in after its heading
    return await page.evaluate("document.body.innerText")


async def graph_bounds(page: Browser) -> list[float]:
    return await page.evaluate(f"""(() => {{
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const item of [...{NODES}, ...(app.graph.groups ?? app.graph._groups ?? [])]) {{
            const r = item.boundingRect ?? item._bounding;
            x0 = Math.min(x0, r[0]); y0 = Math.min(y0, r[1]);
            x1 = Math.max(x1, r[0] + r[2]); y1 = Math.max(y1, r[1] + r[3]);
        }}
        return [x0, y0, x1 - x0, y1 - y0]; }})()""")


async def take(page: Browser, shot: Shot) -> None:
    width, height = shot.viewport
    bounds = await graph_bounds(page)
    if shot.size is None:  # the graph's aspect, fitted to the width, with the same margin on every side
        height = round(shot.fill * width * bounds[3] / bounds[2] + width * (1 - shot.fill))
    await page.viewport(width, height, shot.scale)
    await page.wait_for(f"app.canvas.canvas.width === Math.round({width} * {shot.scale}) || "
                        f"app.canvas.canvas.clientWidth === {width}", "the canvas to resize")
    await page.evaluate(FRAMES)
    await page.evaluate(f"""(() => {{
        app.canvas.deselectAll?.();
        app.canvas.ds.fitToBounds({json.dumps(bounds)}, {{ zoom: {shot.fill} }});
        app.canvas.setDirty(true, true); app.canvas.draw(true, true); return true; }})()""")
    await page.evaluate(FRAMES)
    await close_dialogs(page)
    image = await page.screenshot()
    if shot.size is not None and image.size != shot.size:
        image = image.resize(shot.size, Image.Resampling.LANCZOS)
    shot.path.parent.mkdir(parents=True, exist_ok=True)
    if shot.path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(shot.path, quality=shot.quality, optimize=True, progressive=True)
    else:
        image.save(shot.path, optimize=True)
    log.info("wrote %s (%dx%d, %.0f KiB)", shot.path, *image.size, shot.path.stat().st_size / 1024)


async def template_browser(page: Browser, path: Path) -> None:
    """Open the template browser on the pack's category and save what it shows (the cards as users see them)."""
    await page.viewport(1600, 1100)
    await page.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    option = f"[...document.querySelectorAll('[role=option]')].find(o => o.innerText.trim() === '{PACK_FOLDER}')"
    await page.wait_for(f"!!{option}", "the template browser's category list")
    await page.evaluate(f"({option}).click() ?? true")
    cards = "[...document.querySelectorAll('[data-testid^=template-workflow-] img')]"
    await page.wait_for(f"{cards}.length && {cards}.every(i => i.complete)", "the template cards")
    await asyncio.sleep(0.5)
    shot = await page.screenshot()
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.save(path)
    texts = await page.evaluate("[...document.querySelectorAll('[data-testid^=template-workflow-]')]"
                                ".map(c => c.innerText)")
    log.info("wrote %s; the cards read %s", path, [" / ".join(t.split("\n")) for t in texts])
    await close_dialogs(page, expected=True)


async def screenshot_all(url: str, names: list[str], out: Path, readme: Path, chromium: str,
                         browser_shot: Path | None = None) -> None:
    page = Browser(chromium)
    try:
        await page.connect()
        await open_frontend(page, url)
        for name in names:
            await load_workflow(page, name)
            await take(page, thumbnail(name, out))
            if name == README_WORKFLOW:
                await take(page, readme_shot(readme))
        if browser_shot is not None:
            await template_browser(page, browser_shot)
        problems = [c for c in page.console if c.startswith(("error", "exception"))]
        for line in problems:
            log.debug("browser console: %s", line)
    finally:
        await page.close()


def check_served(server: Server, names: list[str]) -> None:
    """The server lists every workflow as a template of the pack and serves its JSON and thumbnail at the quoted URLs
    the frontend requests."""
    listed = set(server.get("/workflow_templates").get(PACK_FOLDER, []))
    missing = sorted(set(names) - listed)
    if missing:
        raise RuntimeError(f"GET /workflow_templates does not list {missing}")
    for name in names:
        for suffix in (".json", ".jpg"):
            with urllib.request.urlopen(server.url + template_url(name, suffix), timeout=30) as r:
                body = r.read()
            if suffix == ".json":
                if json.loads(body) != json.loads((WORKFLOWS / f"{name}.json").read_text()):
                    raise RuntimeError(f"GET {template_url(name, suffix)} is not {name}.json")
                continue
            size = Image.open(io.BytesIO(body)).size
            log.info("served %s: %s %dx%d", template_url(name, suffix), r.headers.get("Content-Type"), *size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="ID",
                        help="only this workflow (its id, e.g. psedit_edit_sd15, or its file name without .json); "
                             "may be repeated")
    parser.add_argument("--out", type=Path, help="write every image here instead of example_workflows/ and docs/")
    parser.add_argument("--chromium", help="the Chromium executable (default: $CHROMIUM or chromium on PATH)")
    parser.add_argument("--template-browser", type=Path, metavar="PNG",
                        help="also save a screenshot of the template browser on the pack's category (its cards show "
                             "the thumbnails in example_workflows/, not those written to --out)")
    parser.add_argument("--keep", action="store_true", help="keep the server's base directory (its log)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)

    available = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    names = [path_of(n).stem if n in TITLES else n for n in args.only] if args.only else available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"no such workflow: {unknown}; the workflows are {sorted(TITLES)}, in files {available}")
    out = args.out or WORKFLOWS
    readme = args.out / README_IMAGE.name if args.out else README_IMAGE
    chromium = find_chromium(args.chromium)

    server = prepare_server()
    try:
        server.start()
        log.info("ComfyUI is up at %s (base %s)", server.url, server.base)
        asyncio.run(screenshot_all(server.url, names, out, readme, chromium, args.template_browser))
        if out == WORKFLOWS:
            check_served(server, names)
    except Exception:
        log.error("ComfyUI's log ends:\n%s", server.log()[-3000:])
        raise
    finally:
        server.stop(remove=not args.keep)


if __name__ == "__main__":
    main()
