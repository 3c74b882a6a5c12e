"""``telltale view``: the per-token page — annotations in Python, rendering in a real headless
browser (Debian's chromium; skipped when it is not installed: ``apt-get install -y chromium``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN

from lm_eval_telltale.core.stats import EV_ABOVE, EV_ACCEPTED, EV_CANDIDATE, EV_INJECTED, EV_SUPPRESSED
from lm_eval_telltale.tools.view import crossings, render_page, sample_data, think_flags, token_pieces

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_token_pieces_follow_utf8_and_special_tokens(tok):
    text = "a<think>é✓</think>z"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)
    assert pieces[:2] == ["a", "<think>"]
    assert pieces[2:4] == ["", "é"]  # a two-byte character belongs to the token that completes it
    assert pieces[4:7] == ["", "", "✓"]


def test_think_flags():
    assert think_flags(["a", "<think>", "x", "y", "</think>", "z"], False) == [0, 2, 1, 1, 2, 0]
    assert think_flags(["x", "</th", "ink>", "z"], True) == [1, 1, 2, 0]  # the prompt opened the block
    assert think_flags(["x", "y"], False) == [0, 0]


def test_crossings():
    norm = [[1.0], [3.0], [3.0], [1.0], [4.0]]
    tau = [[None], [2.0], [2.0], [2.0], [2.0]]
    assert crossings(norm, tau, 0) == ([4], [3])


def _row(tok, text: str, n_prompt: int = 10, layers=(4, 5)):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    T, L = len(ids) - 1, len(layers)
    rng = np.random.default_rng(0)
    norm = (20 + rng.normal(size=(T, L))).round(4)
    tau = np.full((T, L), 20.5)
    tau[:2] = np.nan
    ev = np.where(norm > tau, EV_ABOVE, 0)
    ev[3, 0] |= EV_CANDIDATE | EV_ACCEPTED
    ev[4, 1] |= EV_INJECTED
    ev[5, 0] |= EV_SUPPRESSED
    return {"task": "t", "doc_id": 0, "repeat": 0, "method": "alrr", "n_prompt_tokens": n_prompt,
            "n_generated_tokens": len(ids), "finish_reason": "length", "response": text, "token_ids": ids,
            "layers": {str(l): {} for l in layers},
            "tokens": {"position": [n_prompt + i for i in range(T)], "norm": norm.tolist(),
                       "tau": [[None if np.isnan(x) else x for x in r] for r in tau.tolist()], "event": ev.tolist()}}


def test_sample_data_maps_traces_to_tokens(tok):
    row = _row(tok, "ab</think>cd</script><b>x")
    d = sample_data(row, None, tok, {"arguments": {"gen_args_0": {"arg_0": "q<think>\n"}}, "target": "7",
                                      "filtered_resps": ["[invalid]"], "metrics": ["exact_match"], "exact_match": 0.0})
    toks = d["tokens"]
    assert len(toks) == len(row["token_ids"])
    assert [t["k"] for t in toks] == list(range(len(toks) - 1)) + [-1]  # the last token is never fed back
    # the prompt opened the thinking block; "</think>" closes it
    assert [t["th"] for t in toks[:4]] == [1, 1, 2, 0]
    assert d["verdict"] == {"exact_match": 0.0} and d["target"] == "7"
    html = render_page(d, 5)
    # the data block cannot end the script early, whatever the model wrote
    data = html.split('<script type="application/json" id="tt-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and json.loads(data)["layer"] == 5
    with pytest.raises(ValueError, match="not recorded"):
        render_page(d, 3)


def test_sample_without_traces_is_a_clear_error(tok):
    row = _row(tok, "abcdefgh")
    del row["tokens"]
    with pytest.raises(ValueError, match="record_tokens=true"):
        sample_data(row, None, tok, None)


# -- the real thing: lm_eval run with record_tokens → telltale view → headless chromium -----------------

def _chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", "--hide-scrollbars",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
                           *extra, page.as_uri()], capture_output=True, text=True, timeout=120)


def check_in_browser(page: Path, tmp: Path) -> str:
    """Renders without console output or script errors, and a screenshot is not blank; returns the DOM."""
    p = _chromium(page, tmp, "--virtual-time-budget=5000", "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-rendered="ok"' in body and "data-errors" not in body, body
    assert '<div id="tt-errors"></div>' in dom  # the page's error sentinel stayed empty
    console = [l for l in p.stderr.splitlines() if ":CONSOLE" in l]
    assert not console, console
    shot = tmp / (page.stem + ".png")
    p = _chromium(page, tmp, "--window-size=1280,900", f"--screenshot={shot}")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (900, 1280)
    assert float(np.std(img)) > 0.02 and len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_synthetic_page_in_browser(tok, tmp_path):
    d = sample_data(_row(tok, "ok <think>let me think</think> the answer is 7"), None, tok, None)
    page = tmp_path / "synthetic.html"
    page.write_text(render_page(d, 4))
    dom = check_in_browser(page, tmp_path)
    assert dom.count('class="thinkblock"') == 1
    assert re.search(r'class="mk R"[^>]*>R<', dom) and re.search(r'class="mk I o"[^>]*>I<', dom)
    assert re.search(r'class="mk S"[^>]*>S<', dom)
    assert 'class="up"' in dom or 'class="down"' in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_browser_check_catches_a_broken_page(tok, tmp_path):
    d = sample_data(_row(tok, "some text here"), None, tok, None)
    page = tmp_path / "broken.html"
    page.write_text(render_page(d, 4).replace("draw();\ndocument.body", "draw();noSuchFunction();\ndocument.body"))
    with pytest.raises(AssertionError, match="data-errors"):
        check_in_browser(page, tmp_path)


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_view_real_run_in_browser(tiny_model_dir, local_task_dir, tmp_path):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process, eager: the engine is not the subject
    out = tmp_path / "run"
    margs = (f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,enforce_eager=True,"
             "layers=4-6,warmup=4,"
             "growth_eps=0.0,record_tokens=true")
    p = subprocess.run([str(BIN / "lm_eval"), "--model", "vllm-alrr", "--model_args", margs, "--tasks", "telltale_local",
                        "--include_path", str(local_task_dir), "--limit", "2", "--batch_size", "auto",
                        "--apply_chat_template", "--output_path", str(out), "--log_samples"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    page = tmp_path / "page.html"
    p = subprocess.run([sys.executable, "-m", "lm_eval_telltale", "view", str(out), "--doc", "1", "--layer", "5",
                        "--out", str(page)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    html = page.read_text()
    data = json.loads(html.split('id="tt-data">', 1)[1].split("</script>", 1)[0])
    assert data["doc_id"] == 1 and data["layer"] == 5 and data["layers"] == [4, 5, 6]
    assert data["target"] == "30" and data["verdict"] == {"exact_match": 0.0}  # joined to lm-eval's samples
    assert len(data["tokens"]) == 24 and len(data["norm"]) == 23
    assert any(ev & EV_ACCEPTED for r in data["event"] for ev in r)  # recursions happened and are marked
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # self-contained
    dom = check_in_browser(page, tmp_path)
    assert dom.count('class="tok') == 24 and 'class="mk R' in dom
    # directory mode: one page per sample + an index
    p = subprocess.run([sys.executable, "-m", "lm_eval_telltale", "view", str(out), "--out", str(tmp_path / "pages")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in (tmp_path / "pages").iterdir()) == [
        "index.html", "telltale_local_doc0_r0.html", "telltale_local_doc1_r0.html"]
    index = (tmp_path / "pages" / "index.html").read_text()
    assert "<h2>Extraction audit</h2>" in index and "<td>telltale_local</td>" in index  # telltale audit's table


# -- issue 14 item 8: --out that exists (or cannot exist) is a clear decision, never a traceback -------

def _sidecar(tok, tmp_path) -> Path:
    f = tmp_path / "telltale_alrr_x.jsonl"
    f.write_text(json.dumps(_row(tok, "ok <think>hm</think> 7")) + "\n")
    return f


@pytest.mark.parametrize("out,msg", [
    ("FILE", "an existing file; one page needs a .html/.htm name"),
    ("DIR.html", "an existing directory with a .html name"),
    ("FILE/page.html", "cannot create it"),
    ("FILE/pages", "cannot create it"),
])
def test_view_out_conflicts_are_clear_errors(tok, tiny_model_dir, tmp_path, capsys, out, msg):
    from lm_eval_telltale.tools.view import main

    (tmp_path / "FILE").write_text("not a page")
    (tmp_path / "DIR.html").mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(_sidecar(tok, tmp_path)), "--model", str(tiny_model_dir), "--out", str(tmp_path / out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and msg in err and "Traceback" not in err
    assert (tmp_path / "FILE").read_text() == "not a page"


def test_view_out_overwrites_a_previous_page(tok, tiny_model_dir, tmp_path):
    from lm_eval_telltale.tools.view import main

    sc = _sidecar(tok, tmp_path)
    page = tmp_path / "page.html"
    page.write_text("old page")
    assert main([str(sc), "--model", str(tiny_model_dir), "--out", str(page)]) == 0
    assert 'id="tt-data"' in page.read_text()
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "index.html").write_text("old index")
    assert main([str(sc), "--model", str(tiny_model_dir), "--out", str(pages)]) == 0
    assert sorted(f.name for f in pages.iterdir()) == ["index.html", "t_doc0_r0.html"]
    assert "old index" not in (pages / "index.html").read_text()
