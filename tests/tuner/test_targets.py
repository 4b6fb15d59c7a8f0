"""Which modules get an adapter, and with what rank and alpha, checked against PEFT's LoRA on one toy model whose
names end one another (proj, q_proj, k_proj; blk.proj, ...): list entries match whole dotted suffixes, a regex
the full name, rank_pattern / alpha_pattern keys the end of the name (whole dotted parts, the first key that
matches), modules_to_save leaves its modules out; and the per-layer settings read the layers of layers_pattern."""

import pytest
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, get_moelora_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.q_proj(x) + self.k_proj(x))


class Net(nn.Module):
    """Top-level projections and the same names one level down (blk.<name>)."""

    def __init__(self):
        super().__init__()
        self.proj, self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.blk = Block()

    def forward(self, x):
        return self.blk(self.proj(self.q_proj(x) + self.k_proj(x)))


def _peft_layers(config_kwargs):
    """name -> (r, scaling) of the LoRA layers PEFT's get_peft_model puts in a Net."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(Net(), LoraConfig(**config_kwargs)).base_model.model
    return {n: (m.r["default"], m.scaling["default"]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _moelora_layers(config_kwargs):
    """name -> (r, scaling) of the MoE-LoRA layers get_moelora_model puts in a Net."""
    model = get_moelora_model(Net(), MoELoRAConfig(num_experts=1, **config_kwargs)).model
    return {n: (m.r, m.scaling) for n, m in model.named_modules() if isinstance(m, moelora.MoELoRALinear)}


# Keys ending other names: "proj" must not give k_proj its rank (a dot must come before it), "k" not k_proj's (the
# key ends the name), and blk.q_proj takes the first key that matches it ("blk.q_proj", not "q_proj").
PATTERNS = {"blk.q_proj": 3, "q_proj": 6, "proj": 2, "k": 5}


@pytest.mark.parametrize("config", [
    dict(target_modules=["proj"]),  # proj and blk.proj, not q_proj / k_proj
    dict(target_modules=["blk.q_proj", "k_proj"]),
    dict(target_modules=r"(blk\.)?(q|proj)"),  # the full name: proj and blk.proj, not q_proj
    dict(target_modules=r"blk\..*"),
    dict(target_modules=["proj", "q_proj", "k_proj"], rank_pattern=PATTERNS),
    dict(target_modules=["proj", "q_proj", "k_proj"], alpha_pattern={k: 2.0 * v for k, v in PATTERNS.items()}),
    # a key is one regex, alternatives included: "k|blk\.proj" gives k_proj nothing (the whole part must match)
    dict(target_modules=["proj", "q_proj", "k_proj"], rank_pattern={r"k|blk\.proj": 3}),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["blk.k_proj"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*\.k_proj"),
    dict(target_modules=["q_proj", "k_proj"], modules_to_save=["k_proj"]),  # a saved module is no target
    dict(target_modules=["proj", "q_proj"], modules_to_save=["blk"]),  # nor is a module inside one
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_targets_ranks_and_alphas_are_peft_s(config):
    config = dict(r=4, lora_alpha=8, **config)
    assert _moelora_layers(config) == _peft_layers(config)


def _staged():
    """Numbered parts at several depths under a model prefix: stages.<i>.layers.<j>.fc (ConvNeXt's), a stack
    layers.<i>.fc, an nn.Sequential's numbered children (merger.mlp.0 / .2) and a dict key that starts with a
    number (head.layers.1x.fc)."""
    def layer():
        block = nn.Module()
        block.fc = nn.Linear(4, 4)
        return block

    net, body = nn.Module(), nn.Module()
    net.model = body
    body.stages = nn.ModuleList(nn.Module() for _ in range(2))
    for stage in body.stages:
        stage.layers = nn.ModuleList(layer() for _ in range(3))
    body.layers = nn.ModuleList(layer() for _ in range(3))
    body.merger = nn.Module()
    body.merger.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    body.head = nn.Module()
    body.head.layers = nn.ModuleDict({"1x": layer()})
    return net


@pytest.mark.parametrize("config,expected", [
    # the first numbered part: the stage, the top-level stack's layer; not merger.mlp.0 / head's 1x
    (dict(layers_to_transform=[1]), ["layers.1.fc", "stages.1.layers.0.fc", "stages.1.layers.1.fc",
                                     "stages.1.layers.2.fc"]),
    (dict(layers_to_transform=[0, 2]), ["layers.0.fc", "layers.2.fc", "stages.0.layers.0.fc", "stages.0.layers.1.fc",
                                        "stages.0.layers.2.fc"]),
    # the layer inside each stage; not head's 1x
    (dict(layers_to_transform=[1], layers_pattern="layers"), ["layers.1.fc", "stages.0.layers.1.fc",
                                                              "stages.1.layers.1.fc"]),
    (dict(layers_to_transform=[0], layers_pattern=["stages"]), ["stages.0.layers.0.fc", "stages.0.layers.1.fc",
                                                                "stages.0.layers.2.fc"]),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else "")
def test_layers_to_transform_selects_the_layers_peft_selects(config, expected):
    """layers_to_transform reads the layer of each module name as PEFT's LoRA does (its selection checked where
    PEFT is 0.21.2 or newer: older ones read the last numbered part, not the first), with and without
    layers_pattern, on a model numbering parts at several depths."""
    import peft
    from packaging.version import Version
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = dict(target_modules=["fc", "mlp.0", "mlp.2"], **config)
    expected = ["model." + name for name in expected]
    model = get_moelora_model(_staged(), MoELoRAConfig(num_experts=1, **config)).model
    assert sorted(n for n, m in model.named_modules() if isinstance(m, moelora.MoELoRALinear)) == expected
    if Version(peft.__version__) >= Version("0.21.2"):
        peft_model = get_peft_model(_staged(), LoraConfig(**config)).base_model.model
        assert sorted(n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)) == expected


class Stacked(nn.Module):
    """Layers in a list of a name outside moelora's default layer names (layers, h, block, blocks, layer)."""

    def __init__(self, n=3):
        super().__init__()
        self.stack = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return x


def test_per_layer_expert_counts_index_the_layers_of_layers_pattern():
    """num_experts per layer (a list, or a callable that the saved config lists) reads the layer of the stack
    that layers_pattern names."""
    config = MoELoRAConfig(target_modules=["q_proj"], layers_pattern="stack", num_experts=[2, 3, 4], top_k=2)
    layers = get_moelora_model(Stacked(), config).model.stack
    assert [block.q_proj.num_experts for block in layers] == [2, 3, 4]

    config = MoELoRAConfig(target_modules=["q_proj"], layers_pattern="stack", num_experts=lambda i, n: 4 - i,
                           top_k=2, layers_to_transform=[0, 2])
    model = get_moelora_model(Stacked(), config)
    assert [getattr(block.q_proj, "num_experts", None) for block in model.model.stack] == [4, None, 2]
    assert model.peft_config["default"].num_experts == [4, 1, 2]  # the untouched layer lists 1


def test_layers_to_transform_as_an_int_is_the_list_of_that_layer():
    """PEFT's layers_to_transform=1 means [1]."""
    for layers in (1, [1]):
        config = MoELoRAConfig(target_modules=["q_proj"], layers_to_transform=layers, num_experts=2, top_k=2)
        model = get_moelora_model(Stacked(), config).model.stack
        assert [isinstance(block.q_proj, moelora.MoELoRALinear) for block in model] == [False, True, False]


@pytest.mark.parametrize("field,value", [("rank_pattern", 4), ("alpha_pattern", 4.0)])
def test_pattern_keys_are_checked_as_the_regex_matching_reads_them(field, value):
    """A rank_pattern / alpha_pattern key is matched as ``(.*\\.)?(?:key)$``: a key that compiles alone but not
    there (a global flag such as ``(?i)``, which must start the whole regex) is refused when the config is made,
    not by a re.error at injection."""
    with pytest.raises(ValueError, match=rf"MoELoRAConfig\.{field} must be a dict of module-name patterns"):
        MoELoRAConfig(**{field: {"(?i)q_proj": value}})
    model = get_moelora_model(Net(), MoELoRAConfig(target_modules=["q_proj"], num_experts=1, r=2,
                                                   **{field: {"blk.q_proj": value}}))
    layer, top = model.model.blk.q_proj, model.model.q_proj
    assert (layer.r, layer.lora_alpha) == ((4, 8) if field == "rank_pattern" else (2, 4.0))
    assert (top.r, top.lora_alpha) == (2, 8)
