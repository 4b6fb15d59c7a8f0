"""Every python block of docs/layers.md runs (blocks share one namespace, in order)."""

import contextlib
import io
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "layers.md")


def test_docs_layers_code_blocks_run():
    text = open(DOC).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 8
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/layers.md block {i}", "exec"), namespace)
    assert "0.1" in out.getvalue()  # the threshold schedule example printed eps
