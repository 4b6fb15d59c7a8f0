"""The scripts in examples/ run (in-process, through their main()) and do what they say."""

import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")
EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_example_lowers_the_eval_loss_and_saves_a_reloadable_adapter(tmp_path):
    result = load_example("train_with_trainer").main(["--steps", "20", "--output-dir", str(tmp_path)])
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.1
    assert {"moelora_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(os.listdir(tmp_path))


def test_plain_loop_example_trains_eagerly_and_compiled(tmp_path):
    example = load_example("train_plain_loop")
    eager = example.main(["--steps", "20"])["losses"]
    assert eager[-1] < eager[0] - 0.1
    compiled = example.main(["--steps", "2", "--compile", "--output-dir", str(tmp_path)])["losses"]
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)  # same model, same first batch
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_custom_layer_example_trains_every_parameter_through_the_ops():
    result = load_example("custom_moe_layer").main(["--steps", "30"])
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["untrained"] == []


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distributed_example_runs_in_one_process(strategy, tmp_path):
    losses = load_example("train_distributed").main(["--strategy", strategy, "--steps", "2",
                                                     "--output-dir", str(tmp_path)])
    assert len(losses) == 2
    assert (tmp_path / "adapter_model.safetensors").exists()
