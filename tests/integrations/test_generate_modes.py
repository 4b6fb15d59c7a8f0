"""MoELoRAModel.generate with per-call task ids beyond a decoder-only model's greedy search: encoder-decoders whose
generate runs its encoder by itself (Whisper from input_features), and the rows generate runs per example
(beams, returned sequences). Each generation is compared with the model merged for the example's task
(merge_and_unload), run on that example alone (tiny random configs, CPU, no downloads)."""

import copy

import pytest
import torch

import moelora

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

_GREEDY = dict(do_sample=False, max_new_tokens=3, eos_token_id=None)


def _whisper():
    config = transformers.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


def _task_routed(base, target_modules, seed=5):
    """``base`` with task-routed adapters (3 tasks) whose A and B are random (B starts at zero), in eval mode."""
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(r=4, num_experts=3, router="task",
                                                                  target_modules=target_modules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("settings", [{}, dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_whisper_generates_each_example_by_its_task_id(settings):
    """Whisper's generate repeats input_features over num_return_sequences before it runs the encoder, which
    generate calls by itself (not through the wrapped model's forward): per-example task ids met the encoder's
    B * n rows unrepeated and raised ("task ids of shape (2,) fit neither ..."). Each example now generates what the
    model merged for its task generates from that example alone."""
    model = _task_routed(_whisper(), ["q_proj", "v_proj", "fc1"])
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    tasks = torch.tensor([2, 0])
    with torch.no_grad():
        out = model.generate(input_features=features, task_ids=tasks, **_GREEDY, **settings)
        alone = [copy.deepcopy(model).merge_and_unload(int(task)).generate(input_features=features[i:i + 1],
                                                                           **_GREEDY, **settings)
                 for i, task in enumerate(tasks)]
    assert torch.equal(out, torch.cat(alone))
    assert all(layer.task_ids is None for layer in moelora.model._task_layers(model.model))
