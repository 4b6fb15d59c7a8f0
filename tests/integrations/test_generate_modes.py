"""MoELoRAModel.generate with per-call task ids beyond a decoder-only model's greedy search: encoder-decoders whose
generate runs its encoder by itself (Whisper from input_features), and the rows generate runs per example
(beams, returned sequences). Each generation is compared with the model merged for the example's task
(merge_and_unload), run on that example alone (tiny random configs, CPU, no downloads)."""

import copy

import pytest
import torch

import moelora
from helpers import tiny_whisper

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

_GREEDY = dict(do_sample=False, max_new_tokens=3, eos_token_id=None)


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
    model = _task_routed(tiny_whisper(), ["q_proj", "v_proj", "fc1"])
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    tasks = torch.tensor([2, 0])
    with torch.no_grad():
        out = model.generate(input_features=features, task_ids=tasks, **_GREEDY, **settings)
        alone = [copy.deepcopy(model).merge_and_unload(int(task)).generate(input_features=features[i:i + 1],
                                                                           **_GREEDY, **settings)
                 for i, task in enumerate(tasks)]
    assert torch.equal(out, torch.cat(alone))
    assert all(layer.task_ids is None for layer in moelora.model._task_layers(model.model))


def test_continuous_batching_routes_every_request_by_the_calls_task_id():
    """transformers' continuous batching (``generate_batch``) took ``task_ids`` for a generation argument it ignores:
    the layers routed by the ids set before (here 2, a silent wrong routing), or raised in its worker thread, which
    returned empty generations. An int routes every request, as the model merged for that task generates; after the
    call the layers hold what they held before. Per-prompt ids, which the packed row cannot take, raise."""
    from helpers import tiny_llama

    model = _task_routed(tiny_llama(num_layers=1), ["q_proj", "v_proj"])
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=63)
    small = transformers.generation.configuration_utils.ContinuousBatchingConfig(  # a small paged cache: fast
        page_size=16, num_blocks=8, max_batch_tokens=64, max_requests_per_batch=4)
    run = dict(inputs=[[5, 9, 14, 3, 22], [40, 17, 8]], generation_config=config, continuous_batching_config=small,
               warmup=False)
    with torch.no_grad():
        want = copy.deepcopy(model).merge_and_unload(1).generate_batch(**run)
        moelora.set_task_ids(model, 2)
        for task_ids in (1, torch.tensor(1)):
            out = model.generate_batch(**run, task_ids=task_ids)
            assert {k: v.generated_tokens for k, v in out.items()} == {k: v.generated_tokens for k, v in want.items()}
            assert all(layer.task_ids.tolist() == 2 for layer in moelora.model._task_layers(model.model))
        with pytest.raises(ValueError, match="task_ids of generate_batch must be an int"):
            model.generate_batch(**run, task_ids=torch.tensor([1, 0]))


def _long_formtiny_whisper():
    """Whisper set up for long-form transcription (timestamps), with 40 input frames per example where a segment
    is 16, the first example's audio ending at frame 20 (so that it drops out of the batch before the second)."""
    model = _task_routed(tiny_whisper(), ["q_proj", "v_proj", "fc1"])
    config = model.generation_config
    config.no_timestamps_token_id, config.max_initial_timestamp_index, config.is_multilingual = 50, 5, False
    features = torch.randn(2, 8, 40, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 20:] = 0
    return model, dict(input_features=features, attention_mask=mask, return_timestamps=True, do_sample=False,
                       max_new_tokens=3)


def test_whisper_long_form_and_temperature_fallback_refuse_ids_they_cannot_route():
    """Whisper's long-form transcription drops the examples that end from the batch, and its temperature fallback
    runs again only the rows that fall back: the rows of those steps cannot be matched to per-example ids. With
    returned sequences the ids were applied to the wrong rows (the second example's sequences generated by the first
    example's task, silently); without, a subset raised a packed-row error. Different ids now raise, naming task_ids
    and the fix; ids that are all one task route by it, as an int does."""
    model, long_form = _long_formtiny_whisper()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"task_ids: .*long-form transcription \(40 input frames"):
            model.generate(**long_form, task_ids=torch.tensor([2, 0]), num_beams=2, num_return_sequences=2)
        assert torch.equal(model.generate(**long_form, task_ids=torch.tensor([1, 1])),
                           model.generate(**long_form, task_ids=1))
        fallback = dict(input_features=long_form["input_features"][..., :16], temperature=(0.0, 0.5), do_sample=False,
                        max_new_tokens=3, eos_token_id=None)
        with pytest.raises(ValueError, match=r"task_ids: .*temperature fallback"):
            model.generate(**fallback, logprob_threshold=-2.0, task_ids=torch.tensor([2, 0]))
        out = model.generate(**fallback, task_ids=torch.tensor([2, 0]))  # no threshold: nothing falls back
        alone = [copy.deepcopy(model).merge_and_unload(task).generate(**{**fallback, "input_features": features})
                 for task, features in ((2, fallback["input_features"][:1]), (0, fallback["input_features"][1:]))]
    assert torch.equal(out, torch.cat(alone))
