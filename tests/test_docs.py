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


def _readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", open(os.path.join(DOCS, os.pardir, "README.md")).read(), flags=re.S)


def test_readme_operator_and_routing_blocks_run():
    """README's first two python blocks run as written on any machine: the operator block (which
    hard-coded device="cuda" and failed on a CPU-only machine) and the routing ops, given the
    tensors they name (identity experts: combine gives x back). The other blocks are outlines
    over a user's model and batch; docs/layers.md holds their runnable form."""
    import torch

    operator, routing = _readme_python_blocks()[:2]
    assert "moelora.moe_lora(" in operator and "moelora.combine(" in routing
    namespace = {}
    exec(compile(operator, "README.md operator block", "exec"), namespace)
    assert namespace["y"].shape == (4096, 1024) and namespace["lora_a"].grad is not None
    x = torch.randn(32, 16)
    namespace = {"torch": torch, "moelora": __import__("moelora"), "E": 4, "x": x, "logits": torch.randn(32, 4)}
    exec(compile(routing.replace("y = moelora.combine", "expert_out = rows\ny = moelora.combine"),
                 "README.md routing block", "exec"), namespace)
    torch.testing.assert_close(namespace["y"], x)


# What README.md says docs/layers.md has a runnable example of, as the calls and arguments its
# blocks must contain.
LAYERS_FEATURES = ['router="topk_softmax"', 'router="threshold"', 'router="task"', "router_jitter_noise",
                   "moelora.aux_loss(", "router_stats(", 'num_experts="8642"', "rank_pattern=", "alpha_pattern=",
                   "upcycle_ffn(", "apply_molex(", "save_pretrained(", "from_pretrained(", "merge_adapter(",
                   "unmerge_adapter(", "export_peft_lora(", "load_peft_lora(", "use_dora=True", "MoELoRAEmbedding",
                   "MoELoRAConv", "modules_to_save=", "disable_adapter_layers(", "enable_adapter_layers(",
                   "add_adapter(", "set_adapter(", 'bias="lora_only"', "aux_loss_mask="]


def test_layers_doc_has_an_example_of_every_feature_the_readme_lists():
    readme = open(os.path.join(DOCS, os.pardir, "README.md")).read()
    assert "`docs/layers.md` has a runnable example for every feature" in readme
    blocks = "\n".join(re.findall(r"```python\n(.*?)```", open(os.path.join(DOCS, "layers.md")).read(), flags=re.S))
    assert [feature for feature in LAYERS_FEATURES if feature not in blocks] == []


def test_public_api_has_docstrings():
    """Every name moelora exports, and the public methods of its classes, say what they do (a
    dataclass's generated signature does not count)."""
    import inspect

    import moelora

    missing = []
    for name in moelora.__all__:
        obj = getattr(moelora, name)
        doc = inspect.getdoc(obj) or ""
        if not doc or doc.startswith(f"{name}("):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("moelora"):
            for attr, value in vars(obj).items():
                func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attr.startswith("_") and inspect.isfunction(func) and not inspect.getdoc(func):
                    missing.append(f"{name}.{attr}")
    assert missing == []


# Public callables whose docstring names their arguments by pointing at another's (name -> the names it points to).
ARGUMENTS_DOCUMENTED_BY = {"LayerSettings": ["MoELoRALinear"], "MoELoRAConfig": ["MoELoRALinear"],
                           "MoELoRAEmbedding": ["MoELoRALinear"], "MoELoRAConv": ["MoELoRALinear"]}


def test_public_api_names_every_argument():
    """help() of every callable moelora exports names each of its arguments (the class docstring and
    __init__'s for a class, and those it points to); a NamedTuple's fields are outputs, not arguments."""
    import inspect

    import moelora

    def doc(obj):
        init = vars(obj).get("__init__") if inspect.isclass(obj) else None
        return "\n".join(inspect.getdoc(o) or "" for o in (obj, init) if o is not None)

    missing = {}
    for name in moelora.__all__:
        obj = getattr(moelora, name)
        if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, tuple)):
            continue
        text = "\n".join(doc(getattr(moelora, n)) for n in [name, *ARGUMENTS_DOCUMENTED_BY.get(name, [])])
        params = [p.name for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unnamed = [p for p in params if not re.search(rf"\b{p}\b", text)]
        if unnamed:
            missing[name] = unnamed
    assert missing == {}


def test_readme_documents_every_environment_variable_the_package_reads():
    """Each variable moelora/ or setup.py reads (os.environ.get, os.getenv, os.environ[...], the
    switches' boolean flags) is named in README.md, where its effect is said."""
    import glob

    root = os.path.join(DOCS, os.pardir)
    sources = glob.glob(os.path.join(root, "moelora", "**", "*.py"), recursive=True) + [os.path.join(root, "setup.py")]
    read = re.compile(r'(?:environ\.get|getenv|_env_flag)\(\s*"([A-Z0-9_]+)"|environ\[\s*"([A-Z0-9_]+)"\s*\]')
    names = {a or b for path in sources for a, b in read.findall(open(path).read())}
    assert {"MOELORA_BACKEND", "MOELORA_VALIDATE", "MOELORA_FORCE_FALLBACK"} <= names  # the pattern finds them
    readme = open(os.path.join(root, "README.md")).read()
    assert sorted(name for name in names if f"`{name}" not in readme) == []
