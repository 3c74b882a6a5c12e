"""Issue 14 item 12: the scorer detects chat templates that open <think> in the prompt.

DeepSeek-R1 distills end the generation prompt with "<think>\\n", so a truncated response has no
opening tag; the scorer then requires "</think>" in every response. Detection reads the
tokenizer's chat template (`prompt_opens_think`), found from `lm_eval ... --apply_chat_template
--model_args pretrained=...` in sys.argv (`auto_require_think_end`, cached) or set by a model
class (`set_prompt_opens_think`); TELLTALE_REQUIRE_THINK_END overrides it both ways.
"""

from __future__ import annotations

import json
import logging

import pytest

from lm_eval_telltale.tasksupport import scoring as S
from lm_eval_telltale.tools.tiny import CHAT_TEMPLATE, byte_tokenizer

# DeepSeek-R1-Distill's template (abridged): the generation prompt opens the think block
R1_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = CHAT_TEMPLATE  # Qwen3-style: the model writes <think> itself
PLAIN_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

GOLD_DOC = {"question": "q", "answer": "She has 18.\n#### 18"}
NO_CLOSE = "Let me think. 6 * 3 = 18, so \\boxed{18}"  # an R1 trace cut off before </think>, or a plain answer
CLOSED = "Let me think. 6 * 3 = 18.\n</think>\n\nThe answer is \\boxed{18}."


def _tokenizer(template: str):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv("TELLTALE_REQUIRE_THINK_END", raising=False)
    monkeypatch.delenv("TELLTALE_THINK_START", raising=False)
    monkeypatch.delenv("TELLTALE_THINK_END", raising=False)
    S.set_prompt_opens_think(None)
    S.auto_require_think_end.cache_clear()
    yield
    S.set_prompt_opens_think(None)
    S.auto_require_think_end.cache_clear()


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    out = {}
    for name, template in (("r1", R1_TEMPLATE), ("qwen3", QWEN3_TEMPLATE), ("plain", PLAIN_TEMPLATE)):
        d = tmp_path_factory.mktemp(f"tok-{name}")
        _tokenizer(template).save_pretrained(d)
        out[name] = d
    return out


def _lm_eval_argv(monkeypatch, model_args: str, chat_template: bool = True):
    argv = ["lm_eval", "--model", "vllm", "--model_args", model_args, "--tasks", "telltale_gsm8k"]
    if chat_template:
        argv.append("--apply_chat_template")
    monkeypatch.setattr("sys.argv", argv)


def _score(response: str) -> tuple[float, float]:
    out = S.process_results_gsm8k(GOLD_DOC, [response])
    return out["exact_match"], out["truncated"]


# --------------------------------------------------------------------------------------------
# prompt_opens_think
# --------------------------------------------------------------------------------------------


def test_prompt_opens_think_r1_template():
    tok = _tokenizer(R1_TEMPLATE)
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<think>\n")
    assert S.prompt_opens_think(tok) is True


def test_prompt_opens_think_qwen3_and_plain_templates():
    qwen3 = _tokenizer(QWEN3_TEMPLATE)
    assert S.prompt_opens_think(qwen3) is False
    # enable_thinking=False closes an empty think block inside the prompt: still not open
    assert "</think>" in qwen3.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert S.prompt_opens_think(qwen3, enable_thinking=False) is False
    assert S.prompt_opens_think(_tokenizer(PLAIN_TEMPLATE)) is False


def test_prompt_opens_think_follows_custom_tags(monkeypatch):
    tok = _tokenizer(R1_TEMPLATE.replace("<think>", "<reasoning>"))
    assert S.prompt_opens_think(tok) is False
    monkeypatch.setenv("TELLTALE_THINK_START", "<reasoning>")
    monkeypatch.setenv("TELLTALE_THINK_END", "</reasoning>")
    assert S.prompt_opens_think(tok) is True


# --------------------------------------------------------------------------------------------
# automatic detection from the lm_eval command line
# --------------------------------------------------------------------------------------------


def test_auto_detection_r1_marks_a_response_without_think_end_truncated(monkeypatch, tok_dirs):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['r1']},max_model_len=4096")
    assert S.auto_require_think_end() is True
    assert S.split_thinking("no tags at all, 5") == ("", True)
    assert _score(NO_CLOSE) == (0.0, 1.0)
    assert _score(CLOSED) == (1.0, 0.0)


def test_auto_detection_qwen3_keeps_the_old_rule(monkeypatch, tok_dirs):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['qwen3']},max_model_len=4096")
    assert S.auto_require_think_end() is False
    assert _score(NO_CLOSE) == (1.0, 0.0)  # a response without tags is an answer
    assert _score("<think>" + NO_CLOSE) == (0.0, 1.0)  # an opened, unclosed block is truncated
    assert _score("<think>" + CLOSED) == (1.0, 0.0)


def test_auto_detection_plain_template(monkeypatch, tok_dirs):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['plain']}")
    assert S.auto_require_think_end() is False
    assert _score(NO_CLOSE) == (1.0, 0.0)


def test_auto_detection_needs_the_chat_template(monkeypatch, tok_dirs):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['r1']}", chat_template=False)
    assert S.auto_require_think_end() is None
    assert _score(NO_CLOSE) == (1.0, 0.0)


def test_auto_detection_argv_forms(monkeypatch, tok_dirs):
    # JSON model_args (lm-eval accepts it), tokenizer= wins over pretrained=
    _lm_eval_argv(monkeypatch, json.dumps({"pretrained": str(tok_dirs["qwen3"]), "tokenizer": str(tok_dirs["r1"])}))
    assert S.auto_require_think_end() is True
    S.auto_require_think_end.cache_clear()
    # `--model_args k=v k=v` (space separated) and `--model_args=...`
    monkeypatch.setattr("sys.argv", ["lm_eval", "--apply_chat_template", "--model_args", "dtype=auto",
                                     f"pretrained={tok_dirs['r1']}", "--tasks", "x"])
    assert S.auto_require_think_end() is True
    S.auto_require_think_end.cache_clear()
    monkeypatch.setattr("sys.argv", ["lm_eval", f"--model_args=pretrained={tok_dirs['qwen3']}", "--apply_chat_template"])
    assert S.auto_require_think_end() is False


def test_auto_detection_never_raises(monkeypatch, tmp_path):
    _lm_eval_argv(monkeypatch, f"pretrained={tmp_path / 'no-such-model'}")
    assert S.auto_require_think_end() is None
    S.auto_require_think_end.cache_clear()
    _lm_eval_argv(monkeypatch, "max_model_len=4096")  # no model named
    assert S.auto_require_think_end() is None
    S.auto_require_think_end.cache_clear()
    _lm_eval_argv(monkeypatch, "{not json")
    assert S.auto_require_think_end() is None
    assert _score(NO_CLOSE) == (1.0, 0.0)


def test_auto_detection_with_think_end_token_warns_and_stays_off(monkeypatch, tok_dirs, caplog):
    # lm-eval strips everything up to </think> itself: no response would contain it any more
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['r1']},think_end_token=</think>")
    with caplog.at_level(logging.WARNING, logger="lm_eval_telltale"):
        assert S.auto_require_think_end() is None
    assert "think_end_token" in caplog.text
    assert _score("The answer is \\boxed{18}.") == (1.0, 0.0)


def test_auto_detection_is_cached(monkeypatch, tok_dirs):
    import transformers

    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def counting(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['r1']}")
    for _ in range(50):
        _score(NO_CLOSE)
    assert len(calls) == 1
    assert calls[0][1].get("local_files_only") is True


# --------------------------------------------------------------------------------------------
# the override and the explicit setter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "no", "off"])
def test_env_override_off_beats_an_r1_template(monkeypatch, tok_dirs, value):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['r1']}")
    monkeypatch.setenv("TELLTALE_REQUIRE_THINK_END", value)
    assert _score(NO_CLOSE) == (1.0, 0.0)


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_env_override_on_beats_a_qwen3_template(monkeypatch, tok_dirs, value):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['qwen3']}")
    monkeypatch.setenv("TELLTALE_REQUIRE_THINK_END", value)
    assert _score(NO_CLOSE) == (0.0, 1.0)
    assert _score(CLOSED) == (1.0, 0.0)


def test_set_prompt_opens_think_wins_over_argv(monkeypatch, tok_dirs):
    _lm_eval_argv(monkeypatch, f"pretrained={tok_dirs['qwen3']}")
    assert _score(NO_CLOSE) == (1.0, 0.0)
    S.set_prompt_opens_think(True)  # e.g. a model class that rendered its own R1 template
    assert S.auto_require_think_end() is True
    assert _score(NO_CLOSE) == (0.0, 1.0)
    monkeypatch.setenv("TELLTALE_REQUIRE_THINK_END", "0")  # the override still wins
    assert _score(NO_CLOSE) == (1.0, 0.0)
    monkeypatch.delenv("TELLTALE_REQUIRE_THINK_END")
    S.set_prompt_opens_think(None)  # back to the command line
    assert S.auto_require_think_end() is False


def test_set_prompt_opens_think_without_a_command_line():
    assert S.auto_require_think_end() is None  # pytest's argv: no lm_eval run
    S.set_prompt_opens_think(True)
    assert S.split_thinking("5") == ("", True)
    S.set_prompt_opens_think(False)
    assert S.split_thinking("5") == ("5", False)
