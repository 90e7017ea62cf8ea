import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "host"))  # tiny.py, comfy_server.py
sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))  # ui_to_api.py
