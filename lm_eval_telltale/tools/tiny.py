"""Deterministic tiny model directories for tests and the demo (random weights).

``telltale tiny-model --arch qwen3|qwen2|llama --out DIR [--force]``: a small decoder (head_dim 64, which
vLLM's CPU attention needs) with a byte-level tokenizer and a chat template that knows
``<think>...</think>`` (Qwen3-style ``enable_thinking``). Special tokens get zero output
embeddings so a greedy random model never stops early — generations run to their budget, which
makes token counts predictable in tests. A directory that already holds a model (a ``config.json``
or weights) is refused unless ``--force``: the new files would replace the weights and config while
anything else there (a model card, a training report) stayed, describing weights that are gone.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..spec import TINY_CHAT_TEMPLATE as CHAT_TEMPLATE
from ..spec import TINY_SPECIALS as SPECIALS

ARCHS = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "llama": ("LlamaForCausalLM", "llama"),
}


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 byte tokens + the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: what makes a directory hold a model (``telltale tiny-model`` refuses to replace one without ``--force``)
MODEL_FILES = ("config.json", "*.safetensors", "*.bin")


def model_files(out: str | Path) -> list[Path]:
    """The files of ``out`` that make it a model directory (a config or weights; see :data:`MODEL_FILES`)."""
    d = Path(out).expanduser()
    if not d.is_dir():
        return []
    return sorted({f for pat in MODEL_FILES for f in d.glob(pat) if f.is_file()})


def build_tiny_model(out: str | Path, arch: str = "qwen3", *, num_layers: int = 8, hidden: int = 128,
                     heads: int = 2, kv_heads: int = 1, intermediate: int = 256, seed: int = 0,
                     max_position: int = 4096) -> Path:
    """Write the model into ``out`` (created; an existing model there is replaced: the command line
    refuses that unless ``--force``, callers here pass fresh or their own directories)."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = byte_tokenizer()
    vocab = len(tok)
    vocab_padded = (vocab + 63) // 64 * 64
    cls_name, model_type = ARCHS[arch]
    cfg_cls = transformers.AutoConfig.for_model(model_type).__class__
    kw = dict(vocab_size=vocab_padded, hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=max_position, tie_word_embeddings=False,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
              torch_dtype="float32", rms_norm_eps=1e-6)
    if arch in ("qwen3", "llama"):
        kw["head_dim"] = hidden // heads
    config = cfg_cls(**kw)
    config.architectures = [cls_name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        # larger random weights give larger, more varied residual-stream norms
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
        head = model.get_output_embeddings().weight
        for t in SPECIALS:
            head[tok.convert_tokens_to_ids(t)] = 0.0
        head[vocab:] = 0.0
        head.add_(0.0)
    model = model.to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out
