"""qwenjax pairs (qwenjax.post.pairs): answers labelled by their final number or by tests run in the sandbox,
a correct one paired with a wrong one, prompts without mixed outcomes skipped and counted; the CLI on a tiny
model, and bad prompt files as one line with exit 2."""

from __future__ import annotations

import json
import shutil

import pytest

from qwenjax.errors import UserError
from qwenjax.post.pairs import answer_matches, build_pairs, extract_code, final_number, read_prompts


def test_final_number_and_code_extraction():
    assert final_number("3 + 4 = 7. So the answer is 7.") == 7
    assert final_number("it is \\boxed{1,234} (I think 5)") == 1234
    assert final_number("no idea") is None
    assert answer_matches("the total is -2.50", "-2.5") and not answer_matches("12", "13")
    text = "Here:\n```python\ndef f():\n    return 1\n```\nand a shell line\n```sh\nls\n```\n"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("def f(): return 2") == "def f(): return 2"


def _write(tmp_path, records, name="prompts.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


def test_math_pairs_and_skips(tmp_path):
    f = _write(tmp_path, [{"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": "6"},
                          {"prompt": [{"role": "user", "content": "5+5?"}], "answer": 10}])
    canned = {"2+2?": ["It is 4.", "It is 5."], "3+3?": ["6", "6.0"], "5+5?": ["11", "nine"]}
    pairs, counts = build_pairs(list(read_prompts(f)), lambda m, k: canned[m[-1]["content"]], 2)
    assert pairs == [{"prompt": "2+2?", "chosen": "It is 4.", "rejected": "It is 5.", "source": f"{f}:1"}]
    assert counts == {"prompts": 3, "pairs": 1, "all_correct": 1, "all_wrong": 1, "answers": 6, "correct": 3}


def test_code_pairs_by_execution_and_a_loop_does_not_stop_the_run(tmp_path):
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    f = _write(tmp_path, [{"prompt": "Write add(a, b).", "tests": tests},
                          {"prompt": "Write add again.", "tests": "assert add(1, 1) == 2"}])
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    loop = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    net = "```python\nimport socket\nsocket.create_connection(('1.1.1.1', 80))\ndef add(a, b):\n    return a + b\n```"
    canned = {"Write add(a, b).": [loop, good, "def add(a, b): return a - b"], "Write add again.": [net, loop, loop]}
    pairs, counts = build_pairs(list(read_prompts(f)), lambda m, k: canned[m[-1]["content"]], 3, timeout_s=1.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(good, loop)]
    assert counts["pairs"] == 1 and counts["all_wrong"] == 1 and counts["correct"] == 1


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x"}, 'exactly one of "answer"'),
    ({"prompt": "x", "answer": 1, "tests": "assert 1"}, 'exactly one of "answer"'),
    ({"prompt": "x", "answer": "seven"}, "is not a number"),
    ({"prompt": "x", "tests": []}, '"tests" must be Python code'),
    ({"prompt": "", "answer": 1}, '"prompt" is empty'),
    ({"answer": 1}, 'expected an object with "prompt"'),
])
def test_bad_prompts_name_file_and_line(tmp_path, record, message):
    f = _write(tmp_path, [{"prompt": "ok", "answer": 1}, record])
    with pytest.raises(UserError, match=f"{f}:2: .*{message}"):
        list(read_prompts(f))


def test_pairs_cli_on_a_tiny_model(run_cli, tiny_tokenizer_path, tmp_path):
    import jax

    from qwenjax import model as qmodel
    from qwenjax import model_io
    from qwenjax.config import ModelConfig
    from qwenjax.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tiny_tokenizer_path).vocab_size
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = tmp_path / "model"
    model_io.save_model(model, cfg, qmodel.init_params(cfg, jax.random.key(0)))
    shutil.copy(tiny_tokenizer_path, model / "tokenizer.model")
    prompts = _write(tmp_path, [{"prompt": f"{a}+1?", "answer": a + 1} for a in range(3)])
    out = tmp_path / "pairs.jsonl"
    status, stdout, err = run_cli("pairs", "--checkpoint", model, "--prompts", prompts, "--out", out, "--k", 2,
                                  "--max-new-tokens", 6)
    assert status == 0, err
    counts = json.loads(stdout.strip().splitlines()[-1])
    assert counts["prompts"] == 3 and counts["answers"] == 6
    assert counts["pairs"] + counts["all_correct"] + counts["all_wrong"] == 3
    assert len(out.read_text().splitlines()) == counts["pairs"]
    bad = _write(tmp_path, [{"prompt": "x", "answer": "?"}], "bad.jsonl")
    status, _, err = run_cli("pairs", "--checkpoint", model, "--prompts", bad, "--out", out)
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == 2 and len(lines) == 1 and f"{bad}:1:" in lines[0], err
