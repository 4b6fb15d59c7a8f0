"""Every python block of the docs runs (blocks of one file share a namespace, in order)."""

import contextlib
import io
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("single_torch_thread")
DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")

# (file, fewest python blocks it has, text its blocks print)
DOC_FILES = [
    ("layers.md", 10, "0.1"),  # the threshold schedule example printed eps
    ("integration.md", 7, "graph breaks: 0"),
]


@pytest.mark.parametrize("name,min_blocks,printed", DOC_FILES, ids=[d[0] for d in DOC_FILES])
def test_docs_code_blocks_run(name, min_blocks, printed):
    text = open(os.path.join(DOCS, name)).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= min_blocks
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/{name} block {i}", "exec"), namespace)
    assert printed in out.getvalue()
