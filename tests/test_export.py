"""torch.export for deployment: the adapter layers, an injected transformers model (task ids as an
input of its forward), upcycled FFNs and MoLEx export with dynamic batch and sequence dims, and
the exported programs compute what the eager modules do, on both backends; exporting leaves the
eager modules working; a model that cannot be exported raises an error that says why and what to
use instead, and so does TorchScript (torch.jit.script / trace), which moelora does not support."""

import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, MoELoRAConv, MoELoRALinear, get_moelora_model
from helpers import randomize_adapters, tiny_llama, token_batch

pytestmark = pytest.mark.usefixtures("single_torch_thread")

BACKENDS = ["torch", "triton"]


def _dims(**named):
    return {name: torch.export.Dim(name, min=low, max=32) for name, low in named.items()}


def _assert_exports_like_eager(module, args, dynamic_shapes, other_args, backend):
    """Export ``module`` on ``backend``; the program equals the eager module on ``args`` and on
    ``other_args`` (other sizes of the dynamic dims, other values)."""
    with moelora.use_backend(backend), torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes).module()
        for inputs in (args, other_args):
            torch.testing.assert_close(program(*inputs), module(*inputs), rtol=1e-5, atol=1e-6)


LAYERS = {
    "softmax_topk": dict(num_experts=4, top_k=2),
    "topk_softmax": dict(num_experts=4, top_k=2, router="topk_softmax", share_lora_a=True),
    "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.2),
    "task": dict(num_experts=3, router="task", task_shared_lora=True),  # one task id for every example
    "single": dict(num_experts=1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(LAYERS))
def test_layer_exports_with_dynamic_batch_and_sequence(mode, backend):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 12), r=4, **LAYERS[mode]).eval()
    randomize_adapters(layer)
    if mode == "task":
        layer.task_ids = 1
    dims = _dims(batch=1, seq=1)
    _assert_exports_like_eager(layer, (torch.randn(2, 5, 16),), ({0: dims["batch"], 1: dims["seq"]},),
                               (torch.randn(3, 7, 16),), backend)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_layer_exported_at_a_prompt_runs_decoding_token_counts_on_the_torch_backend(strict):
    """The torch backend's gathered form (inference at up to 2 (token, slot) pairs per expert) was chosen by
    the traced token count: a layer exported at 2 x 5 tokens guarded the program on 2 T > 8 and refused
    inputs of 4 tokens or fewer (decoding) with "Guard failed". A symbolic count takes the dense form."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 12), r=4, num_experts=4, top_k=2).eval()
    randomize_adapters(layer)
    dims = _dims(batch=1, seq=1)
    with moelora.use_backend("torch"), torch.no_grad():
        program = torch.export.export(layer, (torch.randn(2, 5, 16),), dynamic_shapes=({0: dims["batch"],
                                      1: dims["seq"]},), strict=strict).module()
        for shape in ((1, 1), (2, 2), (3, 9)):
            x = torch.randn(*shape, 16)
            torch.testing.assert_close(program(x), layer(x), rtol=1e-5, atol=1e-6, msg=f"{shape}")


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_exported_layer_runs_the_fused_op_as_eager_does(strict):
    """A plain nn.Linear base on the Triton backend: the exported program calls the fused layer's op,
    as the eager forward does, in torch.export's default non-strict mode too, which traces the module
    with its parameters swapped for FakeTensors (the fused path's test of a plain weight took a fake
    for a tensor subclass, so the program ran the base GEMM, the router and moe_lora apart)."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 12), r=4, num_experts=4, top_k=2).eval()
    randomize_adapters(layer)
    x = torch.randn(2, 5, 16)
    with moelora.use_backend("triton"), torch.no_grad():
        program = torch.export.export(layer, (x,), strict=strict)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-6)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "moelora" in str(n.target)}
    assert ops == {"moelora.moe_lora_linear_fwd.default"}, ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_layer_exports_with_dynamic_batch_and_height(kernel, backend):
    torch.manual_seed(0)
    layer = MoELoRAConv(nn.Conv2d(3, 6, kernel, padding=kernel // 2), num_experts=3, top_k=2, r=4).eval()
    randomize_adapters(layer)
    dims = _dims(batch=1, height=2)
    _assert_exports_like_eager(layer, (torch.randn(2, 3, 5, 5),), ({0: dims["batch"], 2: dims["height"]},),
                               (torch.randn(3, 3, 7, 5),), backend)


class _Logits(nn.Module):
    """The model's logits for token ids and, given, task ids (the MoELoRAModel forward's ``task_ids``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, task_ids=None):
        task = {} if task_ids is None else {"task_ids": task_ids}
        return self.model(input_ids=input_ids, use_cache=False, **task).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_model_exports_with_task_ids_as_an_input(backend):
    """Task ids given to the forward are an input of the exported program: each call routes by
    its own ids (ids set on the layers with set_task_ids would be constants of the program)."""
    config = MoELoRAConfig(r=4, target_modules=r".*(embed_tokens|q_proj|v_proj)", num_experts=3, router="task",
                           task_shared_lora=True)
    model = get_moelora_model(tiny_llama(2), config).eval()
    randomize_adapters(model)
    dims = _dims(batch=1, seq=2)
    _assert_exports_like_eager(_Logits(model), (token_batch(2, 6), torch.tensor([0, 2])),
                               ({0: dims["batch"], 1: dims["seq"]}, {0: dims["batch"]}),
                               (token_batch(3, 9, seed=4), torch.tensor([2, 1, 0])), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_with_routed_adapters_upcycled_ffns_and_molex_exports(backend):
    model = get_moelora_model(tiny_llama(3), MoELoRAConfig(r=4, target_modules=["q_proj", "v_proj"], num_experts=4,
                                                           top_k=2, router="threshold", threshold_eps=0.1))
    moelora.upcycle_ffn(model, num_experts=4, top_k=2, router="softmax_topk")
    moelora.apply_molex(model, gate="linear", layer_selection="device")
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".w_" in name:  # experts that differ from each other
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    dims = _dims(batch=1, seq=2)
    _assert_exports_like_eager(_Logits(model), (token_batch(2, 6), None), ({0: dims["batch"], 1: dims["seq"]}, None),
                               (token_batch(3, 9, seed=4), None), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda: MoELoRALinear(nn.Linear(6, 5), num_experts=1, r=2),
                                  lambda: moelora.MoELoRAEmbedding(nn.Embedding(7, 5), num_experts=1, r=2)],
                         ids=["linear", "embedding"])
def test_exporting_a_single_expert_layer_first_leaves_eager_forwards_working(make, backend, monkeypatch):
    """The single expert's ids and weights, cached per device for every layer of the process, are
    not cached while export traces (its fake tensors hold no values): an export before any eager
    forward cached FakeTensors, and every later eager forward of a single-expert layer on that
    device raised (GuardOnDataDependentSymNode from the routing checks)."""
    from moelora.modules import adapter_base

    monkeypatch.setattr(adapter_base, "_SINGLE", {})  # as in a fresh process
    layer = make().eval()
    randomize_adapters(layer)
    x = torch.tensor([[1, 3, 6]]) if isinstance(layer, moelora.MoELoRAEmbedding) else torch.randn(1, 3, 6)
    with moelora.use_backend(backend), torch.no_grad():
        program = torch.export.export(layer, (x,)).module()
        torch.testing.assert_close(layer(x), program(x), rtol=1e-6, atol=1e-6)
        assert all(type(t) is torch.Tensor for pair in adapter_base._SINGLE.values() for t in pair)


@pytest.mark.parametrize("selection", ["host", "auto"], ids=["host", "auto_layers_differ"])
def test_molex_host_selection_refuses_export_naming_device_selection(selection):
    """Host selection indexes the layer stack by the gate's choice read on the host, which export
    cannot trace: the error says so and names layer_selection='device' (it was torch's
    GuardOnDataDependentSymNode, naming neither). "auto" takes the host path for layers that
    differ (MoLA's per-layer expert counts)."""
    model = tiny_llama(3)
    if selection == "auto":
        model = get_moelora_model(model, MoELoRAConfig(r=4, target_modules=["q_proj"], num_experts=[2, 3, 4]))
    moelora.apply_molex(model, gate="linear", layer_selection=selection)

    with pytest.raises(RuntimeError, match="torch.export cannot trace.*layer_selection='device'"):
        torch.export.export(_Logits(model).eval(), (token_batch(2, 6),))


class _GroupedOps(nn.Module):
    """A learned router, then moe_ffn or moe_lora's grouped regime (per-expert A) on its routing."""

    def __init__(self, op: str):
        super().__init__()
        torch.manual_seed(0)
        self.op, self.router = op, nn.Linear(16, 2, bias=False)
        self.w_in, self.w_out = nn.Parameter(torch.randn(2, 32, 16) / 4), nn.Parameter(torch.randn(2, 16, 32) / 6)
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(2, 8, 16) / 4), nn.Parameter(torch.randn(2, 16, 8))

    def forward(self, x):
        routing = moelora.route(self.router(x), 1)
        if self.op == "moe_ffn":
            return moelora.moe_ffn(x, routing.ids, routing.weights, self.w_in, None, self.w_out, None,
                                   torch.nn.functional.silu)
        return moelora.moe_lora(x, self.lora_a, self.lora_b, routing.ids, routing.weights, scaling=0.5,
                                regime="grouped")


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("op", ["moe_ffn", "moe_lora"])
def test_grouped_ops_export_over_a_token_range_crossing_the_row_class(op, strict, monkeypatch):
    """The grouped layouts pad each expert's segment to a block chosen by the row class (launchers.many_rows:
    MANY_ROWS pairs per expert, 512 tokens here). Exported with dynamic tokens up to 4096, the program took
    the example's class as a guard: export raised "Constraints violated" (with a range crossing the class,
    e.g. MoEFFN's batch x sequence the program refused inputs of more tokens). The block is now symbolic in
    the class (torch.sym_ite) and the program runs both classes. The interpreter's tiles give both classes
    one block, so the blocks are set apart here (32 and 64: multiples of the interpreter's row tile)."""
    from moelora.kernels import launchers

    monkeypatch.setattr(launchers, "grouped_layout_block", lambda shapes=(), many=False: 64 if many else 32)
    module = _GroupedOps(op).eval()
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    with moelora.use_backend("triton"), torch.no_grad():
        program = torch.export.export(module, (torch.randn(8, 16),), dynamic_shapes=({0: tokens},),
                                      strict=strict).module()
        for n in (8, 600):  # few and many rows per expert
            x = torch.randn(n, 16)
            torch.testing.assert_close(program(x), module(x), rtol=1e-5, atol=1e-5)


def _upcycled_ffn():
    model = tiny_llama(1)
    moelora.upcycle_ffn(model, num_experts=4, top_k=2, router="softmax_topk")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".w_" in name:  # experts that differ from each other
                p.add_(torch.randn_like(p) * 0.05)
    return model.model.layers[0].mlp.eval()


TORCHSCRIPT_REFUSED = {
    "linear": (lambda: MoELoRALinear(nn.Linear(16, 12), r=4, num_experts=4, top_k=2), lambda: torch.randn(2, 5, 16)),
    "single_expert": (lambda: MoELoRALinear(nn.Linear(16, 12), r=4, num_experts=1), lambda: torch.randn(2, 5, 16)),
    "embedding": (lambda: moelora.MoELoRAEmbedding(nn.Embedding(20, 16), r=4, num_experts=2, top_k=1),
                  lambda: torch.randint(0, 20, (2, 5))),
    "conv": (lambda: MoELoRAConv(nn.Conv2d(3, 6, 3, padding=1), r=4, num_experts=3, top_k=2),
             lambda: torch.randn(2, 3, 5, 5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(TORCHSCRIPT_REFUSED))
def test_torchscript_refuses_the_layers_naming_torch_export(kind, backend):
    """TorchScript cannot capture the layers: torch.jit.script failed inside moelora's helpers
    ("Compiled functions can't take variable number of arguments"), torch.jit.trace inside the
    forward ("Expected bool, got Tensor" on the torch backend, "'Tensor' object has no attribute
    'bit_length'" on the Triton backend's launchers), naming neither the cause nor torch.export.
    Both now refuse, naming the layer and torch.export, for the layer and for a model holding it, and so does
    torch.onnx.export(dynamo=False), which traces."""
    make, inputs = TORCHSCRIPT_REFUSED[kind]
    layer = make().eval()
    randomize_adapters(layer)
    name = type(layer).__name__
    with moelora.use_backend(backend), torch.no_grad():
        for module in (layer, nn.Sequential(layer)):
            with pytest.raises(RuntimeError, match=f"torch.jit.script cannot capture {name}.*torch.export"):
                torch.jit.script(module)
            with pytest.raises(RuntimeError, match=f"torch.jit.trace cannot capture {name}.*torch.export"):
                torch.jit.trace(module, (inputs(),))
        if kind == "linear":  # torch.onnx's TorchScript exporter traces
            with pytest.raises(RuntimeError, match=f"torch.jit.trace cannot capture {name}.*torch.export"):
                torch.onnx.export(layer, (inputs(),), io.BytesIO(), dynamo=False)


def test_torchscript_refuses_molex_and_the_triton_backends_ffn_naming_torch_export():
    """MoLEx's trace failed with device selection's error about layers that differ (they do not), the
    Triton backend's MoEFFN with "'Tensor' object has no attribute 'bit_length'"."""
    model = tiny_llama(2)
    moelora.apply_molex(model, gate="linear", layer_selection="device")

    with torch.no_grad():
        with pytest.raises(RuntimeError, match="torch.jit.trace cannot capture MoLEx's layer gate.*torch.export"):
            torch.jit.trace(_Logits(model), (token_batch(2, 6),))
        with pytest.raises(RuntimeError, match="torch.jit.script cannot capture MoLEx.*torch.export"):
            torch.jit.script(model)
        ffn = _upcycled_ffn()
        with moelora.use_backend("triton"), pytest.raises(RuntimeError, match="torch.jit.trace cannot capture MoEFFN"):
            torch.jit.trace(ffn, (torch.randn(2, 5, 16),))


@pytest.mark.parametrize("kind", ["merged", "disabled", "ffn_torch_backend"])
def test_torch_jit_trace_records_what_computes_as_traced(kind):
    """What torch.jit.trace records as eager computes it, at another size too: a merged layer and one
    with its adapter disabled (their base layer's forward), and MoEFFN on the torch backend (its expert
    loop is a custom op)."""
    torch.manual_seed(0)
    if kind == "ffn_torch_backend":
        module = _upcycled_ffn()
    else:
        module = MoELoRALinear(nn.Linear(16, 12), r=4, num_experts=1).eval()
        randomize_adapters(module)
        if kind == "merged":
            module.merge()
        else:
            module.disable_adapters = True
    with moelora.use_backend("torch"), torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(2, 5, 16),), check_trace=False)
        for shape in ((2, 5), (3, 7)):
            x = torch.randn(*shape, 16)
            torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)


def _saved_and_loaded(module, before_load=None):
    """``module`` exported on x [2, 5, 16] with dynamic batch and sequence dims, saved with torch.export.save
    and loaded back (``before_load()`` run between: what another process would lack)."""
    dims = _dims(batch=1, seq=1)
    program = torch.export.export(module, (torch.randn(2, 5, 16),),
                                  dynamic_shapes=({0: dims["batch"], 1: dims["seq"]},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    if before_load is not None:
        before_load()
    return torch.export.load(buffer).module()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "ffn"])
def test_saved_and_loaded_program_computes_what_eager_does_at_other_sizes(kind, backend):
    """torch.export.save / load (the deployment round trip) keeps the program's dynamic dims and values."""
    torch.manual_seed(0)
    if kind == "ffn":
        module = _upcycled_ffn()
    else:
        module = MoELoRALinear(nn.Linear(16, 16), r=4, num_experts=4, top_k=2, router="threshold",
                               threshold_eps=0.1).eval()
        randomize_adapters(module)
    with moelora.use_backend(backend), torch.no_grad():
        loaded = _saved_and_loaded(module)
        for shape in ((2, 5), (3, 7), (1, 1)):
            x = torch.randn(*shape, 16)
            torch.testing.assert_close(loaded(x), module(x), rtol=1e-5, atol=1e-6, msg=f"{shape}")


@pytest.mark.parametrize("activation", [nn.Tanh, nn.SiLU])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_ffn_runs_in_another_process_whatever_its_activation(backend, activation, monkeypatch):
    """The Triton backend's moe_ffn op named an activation the fused kernels do not know (nn.Tanh) by a key of the
    exporting process's registry ("callable:<id>"): the saved program, loaded in another process, raised
    KeyError: 'callable:140054750086224'. Export now traces it on the torch backend's path, into the program;
    one the kernels know (nn.SiLU) is named by the kernels' own name ("silu"), which every process has."""
    from moelora.ops import moe_ffn

    torch.manual_seed(0)
    ffn = moelora.MoEFFN(nn.Linear(16, 32), nn.Linear(32, 16), activation(), num_experts=4, top_k=2,
                         router="softmax_topk").eval()
    with torch.no_grad():
        for p in (ffn.w_in, ffn.w_out):  # experts that differ from each other
            p.add_(torch.randn_like(p) * 0.05)
    with moelora.use_backend(backend), torch.no_grad():
        loaded = _saved_and_loaded(ffn, lambda: monkeypatch.setattr(moe_ffn, "_CALLABLES", {}))  # another process
        for shape in ((2, 5), (3, 7)):
            x = torch.randn(*shape, 16)
            torch.testing.assert_close(loaded(x), ffn(x), rtol=1e-5, atol=1e-6, msg=f"{shape}")


_LOAD_IN_A_FRESH_PROCESS = """
import sys, torch
if sys.argv[1] == "import":
    import moelora
for path in sys.argv[2:]:
    try:
        program, (x, expected) = torch.export.load(path).module(), torch.load(path + ".io")
        with torch.no_grad():
            torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-6)
        print(path, "equal")
    except Exception as e:
        print(path, type(e).__name__, str(e).replace("\\n", " "))
"""


def test_saved_programs_run_in_a_fresh_process_that_imports_moelora(tmp_path):
    """The deployment round trip in another process, without TRITON_INTERPRET (CPU tensors run no Triton
    kernel there): importing moelora registers every custom op a program calls (torch.export.load without it
    fails: torch's SerializeError, logged, names the op and says to import it). A program of the torch backend
    computes what eager does; one of the Triton backend, run on the CPU, raised triton's "0 active drivers ([]).
    There should only be one", and now a ValueError naming the torch backend."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    saved = {}
    for name, module, backend in (("ffn", _upcycled_ffn(), "torch"),
                                  ("linear", MoELoRALinear(nn.Linear(16, 12), r=4, num_experts=4, top_k=2).eval(),
                                   "triton")):
        randomize_adapters(module)
        with moelora.use_backend(backend), torch.no_grad():
            saved[name] = str(tmp_path / f"{name}.pt2")
            torch.export.save(torch.export.export(module, (x,)), saved[name])
            torch.save((x, module(x)), saved[name] + ".io")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(moelora.__file__)), env.get("PYTHONPATH", "")])

    def load(mode):
        proc = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, mode, saved["ffn"], saved["linear"]],
                              capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(line.split(" ", 1) for line in proc.stdout.splitlines()), proc.stderr

    results, _ = load("import")
    assert results[saved["ffn"]] == "equal"
    assert results[saved["linear"]].startswith("ValueError moelora::moe_lora_linear_fwd is the Triton backend's op")
    assert "exported on the torch backend" in results[saved["linear"]]
    results, log = load("no_import")
    assert results[saved["ffn"]].startswith("RuntimeError We ran into an error when deserializing")
    # torch 2.13's warning names torch.ops.moelora.router_topk and says to import it; 2.11's logs the ops' schemas
    assert "moelora" in log


def test_aot_inductor_package_of_an_upcycled_ffn_computes_what_eager_does(tmp_path):
    """AOTInductor on the CPU (the torch backend): the package calls moelora's ops (router_topk and dispatch of
    moelora._C, the Python op segment_linear) through torch's dispatcher, at other sizes of the dynamic dims
    too. (One compile: about 10 s.)"""
    torch.manual_seed(0)
    ffn = _upcycled_ffn()
    dims = _dims(batch=1, seq=1)
    with moelora.use_backend("torch"), torch.no_grad():
        program = torch.export.export(ffn, (torch.randn(2, 5, 16),), dynamic_shapes=({0: dims["batch"],
                                      1: dims["seq"]},))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "ffn.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        for shape in ((2, 5), (3, 7)):
            x = torch.randn(*shape, 16)
            torch.testing.assert_close(runner(x), ffn(x), rtol=1e-5, atol=1e-5, msg=f"{shape}")
