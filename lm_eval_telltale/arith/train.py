"""Train the tiny reasoning model shipped in ``lm_eval_telltale/arith/telltale-arith-tiny`` (CPU, deterministic).

``python -m lm_eval_telltale.arith.train --out DIR [--steps N] [--seed S] [--threads T]``

A small Qwen3 (head_dim 64, which vLLM's CPU attention needs) learns the synthetic arithmetic
word problems of :mod:`lm_eval_telltale.arith.data` in the ``<think> … </think>`` format:
the prompt is the chat template applied to the user turn (question + instruction) with the
generation prompt, the target the assistant turn; the loss is on the target tokens only.
Fresh problems are drawn every step from a seeded stream (never a held-out one).

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)``, one process, a fixed
number of steps (``--minutes`` is only a safety stop; a run it cuts short is not reproducible).
Floating-point results can still depend on the CPU and the thread count.

At the end the weights are saved in bfloat16 (the config says float32, so transformers and vLLM
compute in float32 from the bf16 values), with the tokenizer (a BPE trained on generated problems) and its chat template,
and the held-out split is decoded greedily with transformers (on the saved weights): accuracy
per level, wall time and the final loss go to ``DIR/train_report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from lm_eval_telltale.arith import data

#: the shipped model's architecture (see MODEL_CARD.md)
DEFAULTS = dict(hidden=128, heads=2, kv_heads=1, intermediate=384, layers=8)


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_tokenizer(seed: int = 0, vocab_size: int = 448, n_docs: int = 4000):
    """A byte-level BPE tokenizer trained on generated problems (digits always single tokens, as
    in Qwen's tokenizer): words of the generator become one token each, so a problem is ~90
    tokens instead of ~330 bytes. Any text still encodes (byte fallback through the byte
    alphabet); decoding is exact. Same special tokens and chat template as the random tiny models (``spec.TINY_*``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lm_eval_telltale.spec import TINY_CHAT_TEMPLATE as CHAT_TEMPLATE
    from lm_eval_telltale.spec import TINY_SPECIALS as SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stream = data.train_stream(seed + 7919)
    texts = ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"]
    for _ in range(n_docs):
        d = next(stream)
        texts += [data.doc_to_text(d), data.target_text(d)]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tok, *, hidden: int, heads: int, kv_heads: int, intermediate: int, layers: int, seed: int,
                max_position: int = 1024):
    import torch
    import transformers

    vocab_padded = (len(tok) + 63) // 64 * 64
    cfg = transformers.Qwen3Config(
        vocab_size=vocab_padded, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
        max_position_embeddings=max_position, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg)
    model.config.use_cache = True
    return model


def encode(tok, doc: dict) -> tuple[list[int], list[int]]:
    prompt, completion = data.training_text(doc, tok)
    return tok(prompt, add_special_tokens=False).input_ids, tok(completion, add_special_tokens=False).input_ids


def batches(tok, seed: int, batch_size: int, pool: int = 8):
    """Endless deterministic batches (input_ids, labels; labels -100 outside the completion):
    ``pool`` batches' worth of problems are drawn, sorted by length and cut into batches (less
    padding), then shuffled."""
    import random

    import torch

    stream = data.train_stream(seed)
    rng = random.Random(seed + 1)
    pad = tok.pad_token_id
    while True:
        examples = [encode(tok, next(stream)) for _ in range(batch_size * pool)]
        examples.sort(key=lambda e: len(e[0]) + len(e[1]))
        chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            n = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), n), pad, dtype=torch.long)
            labels = torch.full((len(chunk), n), -100, dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                seq = p + c
                ids[i, :len(seq)] = torch.tensor(seq)
                labels[i, len(p):len(seq)] = torch.tensor(c)
            yield ids, labels


def greedy_answers(model, tok, docs: list[dict], batch_size: int = 64, max_new_tokens: int = 160) -> list[str]:
    """Greedy continuations (special tokens kept, EOS cut) of the chat prompts of ``docs``,
    batched with left padding."""
    import torch

    tok.padding_side = "left"
    prompts = [data.chat_prompt(d, tok) for d in docs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for i, row in zip(idx, gen[:, enc.input_ids.shape[1]:].tolist()):
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id)]
                row = [t for t in row if t != tok.pad_token_id]
                out[i] = tok.decode(row, skip_special_tokens=False)
    return out


def evaluate(model, tok, docs: list[dict], **kw) -> dict:
    """Accuracy with the task's scorer (``process_results_math``), overall and per level."""
    from lm_eval_telltale.tasksupport.scoring import process_results_math

    responses = greedy_answers(model, tok, docs, **kw)
    per: dict[int, list[float]] = {}
    trunc = 0.0
    for d, r in zip(docs, responses):
        res = process_results_math(d, [r])
        per.setdefault(int(d["level"]), []).append(res["exact_match"])
        trunc += res["truncated"]
    allv = [v for vs in per.values() for v in vs]
    return {
        "accuracy": sum(allv) / len(allv),
        "per_level": {f"L{k}": sum(v) / len(v) for k, v in sorted(per.items())},
        "n_per_level": {f"L{k}": len(v) for k, v in sorted(per.items())},
        "truncated": trunc / len(docs),
        "n": len(docs),
        "examples": [{"question": d["question"], "gold": d["answer"].rsplit("####", 1)[1].strip(), "response": r}
                     for d, r in list(zip(docs, responses))[:: max(1, len(docs) // 8)]],
    }


def save(model, tok, out: Path) -> None:
    """bf16 weights (config dtype float32), tokenizer with chat template, generation config."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.config.dtype = "float32"
    model.save_pretrained(out, state_dict=sd, safe_serialization=True)
    tok.padding_side = "left"
    tok.save_pretrained(out)
    gen = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "do_sample": False,
           "max_new_tokens": 256}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def load_saved(path: Path):
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok


def train(out: Path, *, steps: int, seed: int, batch_size: int, lr: float, warmup: int, weight_decay: float,
          minutes: float | None, eval_every: int, eval_n: int, eval_docs: int | None = None, **arch) -> dict:
    import torch

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    tok = build_tokenizer(seed)
    model = build_model(tok, seed=seed, **arch)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {arch} -> {n_params / 1e6:.2f}M parameters; {steps} steps of {batch_size}, lr {lr}, "
         f"threads {torch.get_num_threads()}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    test_docs = data.test_split()
    if eval_docs is not None:  # a quick check (tests); the shipped report uses the whole split
        test_docs = [d for lv in data.LEVELS for d in [x for x in test_docs if x["level"] == lv][: max(1, eval_docs // 4)]]
    probe = [d for lv in data.LEVELS for d in [x for x in test_docs if x["level"] == lv][: max(1, eval_n // 4)]]
    t0 = time.time()
    n_tok = 0
    ema = None
    history = []
    model.train()
    stopped_early = False
    for step, (ids, labels) in zip(range(steps), batches(tok, seed, batch_size)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_tok += ids.numel()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            _log(f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  lr {lr_at(step):.2e}  "
                 f"{n_tok / el:.0f} tok/s  {el / 60:.1f} min")
            history.append({"step": step, "loss": round(loss.item(), 5), "ema": round(ema, 5),
                            "minutes": round(el / 60, 2)})
        if eval_every and step and step % eval_every == 0:
            res = evaluate(model, tok, probe)
            model.train()
            _log(f"  probe ({len(probe)}): {res['accuracy']:.3f} {res['per_level']}")
        if minutes is not None and time.time() - t0 > minutes * 60:
            _log(f"stopping at step {step}: --minutes {minutes} reached (this run is not reproducible)")
            stopped_early = True
            break
    train_s = time.time() - t0
    save(model, tok, out)
    # evaluate what ships: the bf16 weights as loaded by transformers
    model, tok = load_saved(out)
    t1 = time.time()
    res = evaluate(model, tok, test_docs)
    eval_s = time.time() - t1
    report = {
        "arch": arch, "parameters": n_params, "steps": step + 1, "batch_size": batch_size, "lr": lr,
        "warmup": warmup, "weight_decay": weight_decay, "seed": seed, "threads": torch.get_num_threads(),
        "tokens": n_tok, "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "final_loss_ema": round(ema, 5), "stopped_early": stopped_early, "tokenizer_vocab": len(tok),
        "torch": torch.__version__, "test": res, "history": history,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    _log(f"trained {step + 1} steps in {train_s / 60:.1f} min ({n_tok} tokens); final loss (EMA) {ema:.4f}")
    _log(f"held-out accuracy (transformers greedy, {res['n']} problems): {res['accuracy']:.3f}  "
         f"{res['per_level']}  truncated {res['truncated']:.3f}  ({eval_s:.0f} s)")
    return report


def write_model_card(out: Path, report: dict) -> Path:
    """``MODEL_CARD.md`` from the training report (the figures are the report's, nothing typed in)."""
    a, t = report["arch"], report["test"]
    levels = " | ".join(f"{k}: {v * 100:.1f} %" for k, v in t["per_level"].items())
    ex = t["examples"][0] if t.get("examples") else None
    defaults = (report["steps"], report["batch_size"], report["lr"], report["warmup"], report["seed"])
    cmd = "python -m lm_eval_telltale.arith.train --out DIR"
    if defaults != (1000, 16, 3e-3, 100, 0) or a != DEFAULTS:
        cmd += (f" --steps {report['steps']} --batch-size {report['batch_size']} --lr {report['lr']} "
                f"--warmup {report['warmup']} --seed {report['seed']} "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items()))
    text = f"""# telltale-arith-tiny: the embedded default model of lm-eval-telltale

A {report['parameters'] / 1e6:.2f} M-parameter Qwen3 (`Qwen3ForCausalLM`) trained from scratch on CPU
by `{cmd}` to solve the synthetic arithmetic word problems of
`lm_eval_telltale.arith.data` in a Qwen3-style thinking format. It exists so that `make eval`
and the CI regression tests measure something real offline; it is not a general model.

## Architecture
- {a['layers']} decoder layers, hidden size {a['hidden']}, {a['heads']} attention heads × head_dim 64
  ({a['kv_heads']} KV head(s)), MLP {a['intermediate']}, RMSNorm, RoPE θ = 10000, tied embeddings,
  context 1024.
- Tokenizer: byte-level BPE with {report['tokenizer_vocab']} tokens trained on generated problems
  (digits are single tokens, as in Qwen's tokenizer; any text encodes through the byte alphabet),
  special tokens `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (EOS), `<think>`, `</think>`,
  and a ChatML chat template (`enable_thinking=false` inserts an empty think block).
- Weights stored in bfloat16 (`model.safetensors`); `config.json` says float32, so transformers and
  vLLM compute in float32 from those values.

## Data
- Generator: a person starts with 2..20 items, then 1..4 operations (one sentence each: gain or
  lose 1..20, or double), values stay in 0..99. The number of operations is the difficulty
  level. The user turn is the question + "{data.INSTRUCTION}".
- Target (loss on these tokens only):
  `<think>` + the story's first sentence, then per operation its sentence and the calculation
  (`She buys 5 more. 7 + 5 = 12.`) + `</think>` + `The answer is \\boxed{{N}}.<|im_end|>`.
- Held-out split (`telltale_arith`): a problem is a test problem iff the first byte of the SHA-256
  of its question is < {data.TEST_HASH_CUTOFF} (~10 %); training draws only the others, so train and
  test are disjoint by construction. Test: {data.TEST_PER_LEVEL} distinct problems per level, seeds
  {data.TEST_SEED}+level.

## Training
- {report['steps']} steps × batch {report['batch_size']} of fresh problems (seed {report['seed']}, levels uniform),
  {report['tokens']:,} tokens incl. padding; AdamW (β = 0.9, 0.98, weight decay {report['weight_decay']} on
  matrices), lr {report['lr']} with {report['warmup']} warm-up steps then cosine to 5 %, gradient clip 1.0.
- {report['threads']} CPU threads, torch {report.get('torch', '?')}, `torch.use_deterministic_algorithms(True)`:
  training took {report['train_seconds'] / 60:.1f} min (+ {report['eval_seconds']:.0f} s of held-out
  evaluation); final training loss (EMA) {report['final_loss_ema']:.4f}. Rerunning the command on
  the same machine gives the same weights; other CPUs or thread counts may differ in the last bits.

## Accuracy
Greedy decoding with transformers on the saved weights, the whole held-out split ({t['n']} problems),
scored by the task's scorer (`process_results_math`: the answer after `</think>`, `\\boxed{{}}`):

- **{t['accuracy'] * 100:.1f} %** overall; by level (number of operations): {levels};
  truncated: {t['truncated'] * 100:.1f} %.
- The same figure through vLLM and lm-eval is in `results/arith.md` (`make eval`).
""" + (f"""
Example ({ex['question']!r}, gold {ex['gold']}):

```
{ex['response']}
```
""" if ex else "")
    p = out / "MODEL_CARD.md"
    p.write_text(text)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm_eval_telltale.arith.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=None, help="safety stop (wall-clock); breaks reproducibility")
    ap.add_argument("--eval-every", type=int, default=0, help="probe accuracy every N steps (0: only at the end)")
    ap.add_argument("--eval-n", type=int, default=40)
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arch = {k: getattr(a, k) for k in DEFAULTS}
    train(a.out, steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
          weight_decay=a.weight_decay, minutes=a.minutes, eval_every=a.eval_every, eval_n=a.eval_n,
          **arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
