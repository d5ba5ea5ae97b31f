"""The README's Python examples run as written."""

import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        if "transformers" in block and importlib.util.find_spec("transformers") is None:
            continue  # the optional `hf` extra is not installed
        exec(compile(block, str(README), "exec"), {})
