"""evals/: a checkpoint's val loss and samples, against the training run's own log and slow loops written here."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import HANG_S
from tests.gptdata import SMALL_BOS, write_tiktoken_plugin
from tests.test_gpt import ROOT, TINY, load_ckpt, parse_log, run_cli

sys.path.insert(0, os.path.join(ROOT, "evals"))
import hellaswag  # noqa: E402
import sample  # noqa: E402
import val_loss  # noqa: E402

VAL_LOSS, SAMPLE, HELLASWAG = (os.path.join(ROOT, "evals", f"{name}.py") for name in ("val_loss", "sample",
                                                                                      "hellaswag"))

# a tiktoken plugin for the tiny corpus' vocabulary: the 256 bytes, 256 two-byte merges (ids < 512) and the corpus'
# BOS, 512, as <|endoftext|>: 513 ids, within the 520-row model
PLUGIN = r'''
def ranks():
    strings = [bytes([i]) for i in range(256)] + [bytes([97 + i % 26, 97 + i // 26]) for i in range(256)]
    return {string: i for i, string in enumerate(strings)}

def evals_tiny():
    return dict(name="evals_tiny", pat_str=r"""\S+|\s+""", mergeable_ranks=ranks(),
                special_tokens={"<|endoftext|>": 512})

ENCODING_CONSTRUCTORS = {"evals_tiny": evals_tiny}
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    folder = write_tiktoken_plugin(tmp_path_factory.mktemp("plugin"), "speedrun_evals_test", PLUGIN)
    return dict(os.environ, PYTHONPATH=f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, gpt_files, plugin_env):
    """A 7-step tiny run (three stages, YaRN updates) validated at steps 0, 3, 6 and 7, saved at 3 and 7, and with
    --run_evals=1 on 30 HellaSwag-shaped items (hellaswag.jsonl in its folder): its folder and its logged val losses
    by step."""
    d = tmp_path_factory.mktemp("saved")
    write_items(d / "hellaswag.jsonl", random_items(30, seed=1))
    r = run_cli(gpt_files + TINY + ["--num_iterations=7", "--num_extension_iterations=1", "--val_loss_every=3",
                                    "--save_checkpoint=1", "--checkpoint_every=3", "--run_id=run", "--run_evals=1",
                                    "--hellaswag_data=hellaswag.jsonl", "--eval_encoding=evals_tiny"], d,
                env=plugin_env)
    assert r.returncode == 0, r.stderr
    return d, dict(parse_log(d / "logs/run.txt")[2])


def run_tool(script, args, cwd, world=1, env=None):
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                                 if world > 1 else [])
    return subprocess.run([*launch, script, *args], cwd=cwd, capture_output=True, text=True, timeout=HANG_S,
                          env=env or dict(os.environ, OMP_NUM_THREADS="1"))


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and r.stdout == "", r.stderr[-2000:]
    return lines[0]


def refusals(module, script, cases, cwd, monkeypatch, env=None):
    """Each case's UserError in-process, a line holding its words; the first case also as a command: that one line
    on stderr, exit code 2, nothing on stdout (the tools share tg.run_tool)."""
    monkeypatch.chdir(cwd)
    for args, words in cases:
        with pytest.raises(tg.UserError) as e:
            module.main(args)
        assert words in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
    args, words = cases[0]
    assert words in one_line(run_tool(script, args, cwd, env=env))


# ---------------------------------------------------------------------------------------------- val_loss.py

def test_val_loss_of_a_checkpoint_is_the_runs_on_1_and_2_processes(saved_run):
    # the run's validations at step 3 (after YaRN's first update) and 7 (the final one: its own window, no YaRN),
    # recomputed from the checkpoints alone, to the log's 4 decimals
    d, logged = saved_run
    for step, world in [(3, 1), (7, 1), (7, 2)]:
        r = run_tool(VAL_LOSS, [f"logs/run/state_step{step:06d}.pt"], d, world)
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.fullmatch(r"val_loss:(\d+\.\d{4}) step:(\d+) val_tokens:3000\n", r.stdout)
        assert m and int(m[2]) == step and abs(float(m[1]) - logged[step]) <= 1e-4, (r.stdout, logged)
    assert logged[3] != logged[7]


def test_val_loss_refuses_bad_input_with_one_line(saved_run, tmp_path, monkeypatch):
    d = saved_run[0]
    sd = load_ckpt(d / "logs/run/state_step000007.pt")
    sd["hyperparameters"]["model_dim"] = 128  # weights of width 64
    torch.save(sd, tmp_path / "wide.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(dict(model=sd["model"], steps=[7]), tmp_path / "average.pt")  # as average_step*.pt: weights only
    final = "logs/run/state_step000007.pt"
    cases = [(["nope.pt"], "nope.pt: no such file"), ([str(tmp_path / "text.pt")], "cannot be read as a checkpoint"),
             ([str(tmp_path / "average.pt")], "not a checkpoint of train_gpt.py"),
             ([str(tmp_path / "wide.pt")], "its weights do not fit the model"), ([], "one checkpoint expected"),
             ([final, "--val_tokens=5"], "unknown option --val_tokens=5"),
             ([final, "--val_files=nothing_*.bin"], "nothing_*.bin")]
    refusals(val_loss, VAL_LOSS, cases, d, monkeypatch)


# ---------------------------------------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def final_model(saved_run):
    d = saved_run[0]
    return tg.load_for_eval(str(d / "logs/run/state_step000007.pt"))


def test_next_logits_are_the_validations_arithmetic(final_model):
    # -log softmax of the sampler's logits at a position = the validation's summed cross-entropy with that one target
    trainer, step = final_model
    windows = trainer.set_windows(step)
    rng = np.random.default_rng(0)
    tokens = [SMALL_BOS] + rng.integers(0, 512, 150).tolist()  # two blocks
    for n, target in [(1, 7), (40, 300), (151, 5)]:
        logits = sample.next_logits(trainer, tokens[:n], windows)
        inputs = np.array(tokens[:n] + [0] * (-n % tg.BLOCK), dtype=np.int32)
        targets = torch.full((len(inputs),), -100)
        targets[n - 1] = target
        bigram = torch.from_numpy(tg.bigram_index(inputs, trainer.h.bigram_vocab_size))
        with torch.no_grad():
            x = torch.from_numpy(inputs)
            loss = trainer.model(x, targets, bigram, trainer.model.layer_masks(x, windows, False))
        assert abs(float(-F.log_softmax(logits, -1)[target]) - float(loss)) < 1e-5 * float(loss), n


def test_top_k_1_is_greedy_decoding_by_full_forwards(final_model):
    # the reference: each next token the argmax over the encoding's ids of a forward over the text padded with
    # random tokens instead of zeros (what follows the text must not matter), stopping before a BOS
    trainer, step = final_model
    windows = trainer.set_windows(step)
    rng, prompt = np.random.default_rng(1), [SMALL_BOS, 97, 98, 32, 99]
    got = sample.generate(trainer, step, prompt, 12, top_k=1, n_vocab=513)
    want = []
    for _ in range(12):
        text = prompt + want
        inputs = np.concatenate([text, rng.integers(0, 520, -len(text) % tg.BLOCK)]).astype(np.int32)
        bigram = torch.from_numpy(tg.bigram_index(inputs, trainer.h.bigram_vocab_size))
        with torch.no_grad():
            x = torch.from_numpy(inputs)
            hidden = trainer.model(x, None, bigram, trainer.model.layer_masks(x, windows, False))
            token = int(tg.softcap(trainer.model.lm_head(hidden[len(text) - 1])).float()[:513].argmax())
        if token == SMALL_BOS:
            break
        want.append(token)
    assert got == want and len(want) > 0


def test_a_seed_repeats_its_sample_and_another_differs(final_model):
    trainer, step = final_model
    runs = [sample.generate(trainer, step, [SMALL_BOS, 97], 20, seed=seed, n_vocab=513) for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]
    assert all(t < 513 and t != SMALL_BOS for t in runs[0])


def test_sample_prints_the_prompt_and_its_continuation(saved_run, final_model, plugin_env):
    import tiktoken
    d = saved_run[0]
    r = run_tool(SAMPLE, ["logs/run/state_step000007.pt", "--prompt=ab cd", "--max_new_tokens=8", "--top_k=1",
                          "--encoding=evals_tiny"], d, env=plugin_env)
    assert r.returncode == 0, r.stderr[-2000:]
    namespace = {}
    exec(PLUGIN, namespace)
    enc = tiktoken.Encoding(**namespace["evals_tiny"]())  # the plugin's encoding, built here without the registry
    trainer, step = final_model
    tokens = [SMALL_BOS] + enc.encode("ab cd")
    assert r.stdout == "ab cd" + enc.decode(sample.generate(trainer, step, tokens, 8, top_k=1, n_vocab=513)) + "\n"


def test_sample_refuses_bad_input_with_one_line(saved_run, plugin_env, monkeypatch):
    d, final = saved_run[0], "logs/run/state_step000007.pt"
    cases = [([final, "--prompt="], "--prompt is empty or missing"), ([final], "--prompt is empty or missing"),
             (["nope.pt", "--prompt=x"], "nope.pt: no such file"), ([final, "--prompt=x", "--top_p=1"], "--top_p"),
             ([final, "--prompt=x", "--temperature=0"], "--temperature > 0"),
             ([final, "--prompt=x", "--encoding=no_such"], "--encoding=no_such: tiktoken cannot load it"),
             ([final, "--prompt=x", "--max_new_tokens=two"], "--max_new_tokens=two: not an integer")]
    refusals(sample, SAMPLE, cases, d, monkeypatch, plugin_env)


# ---------------------------------------------------------------------------------------------- hellaswag.py


def plugin_encoding():
    import tiktoken
    namespace = {}
    exec(PLUGIN, namespace)
    return tiktoken.Encoding(**namespace["evals_tiny"]())  # the plugin's encoding, built here without the registry


def random_items(n, seed=0):
    """n HellaSwag-shaped items of random lowercase words (the plugin encodes them), labels 0-3."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join("".join(rng.choice(list("abcdefghij"), rng.integers(1, 6))) for _ in range(k))
    return [(words(rng.integers(3, 30)), [words(rng.integers(1, 12)) for _ in range(4)], int(rng.integers(4)))
            for _ in range(n)]


def write_items(path, items):
    with open(path, "w") as f:
        for ctx, endings, label in items:
            f.write(json.dumps(dict(ind=0, ctx=ctx, endings=endings, label=str(label), split="val")) + "\n")


def one_by_one(trainer, step, items, enc, before=None):
    """The slow reference: each ending after its context in a forward of its own ([BOS, ctx, ending], padded with
    random tokens to one block), the sum of its tokens' log-likelihoods. before[(item, j)] = (tokens to put ahead of
    ending j's BOS, the length to pad to with random tokens instead)."""
    windows = trainer.set_windows(step)
    rng, out = np.random.default_rng(9), []
    for index, (ctx, endings, _) in enumerate(items):
        c = enc.encode_ordinary(ctx)
        scores = []
        for j, ending in enumerate(endings):
            e = enc.encode_ordinary(" " + ending)
            ahead, length = (before or {}).get((index, j), ([], None))
            doc = [*ahead, SMALL_BOS, *c, *e]
            pad = -len(doc) % tg.BLOCK if length is None else length - len(doc)
            tokens = np.concatenate([doc, rng.integers(0, 520, pad)]).astype(np.int32)
            x = torch.from_numpy(tokens)
            bigram = torch.from_numpy(tg.bigram_index(tokens, trainer.h.bigram_vocab_size))
            with torch.no_grad():
                hidden = trainer.model(x, None, bigram, trainer.model.layer_masks(x, windows, False))
                logp = F.log_softmax(tg.softcap(trainer.model.lm_head(hidden)).float(), -1)
            positions = range(len(doc) - len(e) - 1, len(doc) - 1)  # the positions that predict the ending's tokens
            scores.append((sum(float(logp[p, doc[p + 1]]) for p in positions), len(e)))
        out.append(scores)
    return out


def test_hellaswag_packs_score_each_ending_as_its_own_forward(final_model):
    trainer, step = final_model
    enc, items = plugin_encoding(), random_items(40)
    tokenized = [(enc.encode_ordinary(c), [enc.encode_ordinary(" " + e) for e in es]) for c, es, _ in items]
    packs = hellaswag.pack(tokenized, 512, SMALL_BOS)
    assert len(packs) > 3  # several packs, each of whole blocks
    seen = []
    for tokens, spans in packs:
        assert len(tokens) % tg.BLOCK == 0
        for index, item_spans in spans:  # an item's 4 spans in one pack, each predicting exactly its ending
            seen.append(index)
            for (a, b), ending in zip(item_spans, tokenized[index][1]):
                assert tokens[a] == (tokenized[index][0] or [SMALL_BOS])[-1] and list(tokens[a + 1:b + 1]) == ending
    assert sorted(seen) == list(range(len(items)))
    windows = trainer.set_windows(step)
    packed = {}
    for tokens, spans in packs:
        packed.update(hellaswag.ending_log_likelihoods(trainer, windows, tokens, spans))
    # within 1e-3 of the lone forwards (1.7e-4 seen): a packed document's BOS also takes, as in training and the
    # validation, the key offset, smear and bigram hash of the token before it; the choices are the same
    reference = one_by_one(trainer, step, items, enc)
    for index, want in enumerate(reference):
        got = packed[index]
        assert [n for _, n in got] == [n for _, n in want]
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-3, atol=1e-5)
        assert np.argmax([s for s, _ in got]) == np.argmax([s for s, _ in want])
    # and to float rounding (3e-9 seen) of forwards of the pack's tokens up to the document, then the document, then
    # random tokens to the pack's length: what follows a document does not reach it. (Random tokens ahead instead,
    # the token before the BOS kept, moved scores by up to 1.3e-5: the BOS's key offset takes that token's key,
    # which the whole previous document shaped, as in training.)
    before = {}
    for tokens, spans in packs:
        for index, item_spans in spans:
            for j, (a, _) in enumerate(item_spans):
                before[(index, j)] = list(tokens[:a - len(tokenized[index][0])]), len(tokens)  # up to the BOS
    in_pack = one_by_one(trainer, step, items, enc, before)
    for index, want in enumerate(in_pack):
        np.testing.assert_allclose([s for s, _ in packed[index]], [s for s, _ in want], rtol=1e-6, atol=1e-6)
    acc, acc_norm, n, _ = hellaswag.evaluate(trainer, step, items, enc, 512)
    labels = [label for _, _, label in items]
    assert n == 40 and acc == np.mean([np.argmax([s for s, _ in r]) == y for r, y in zip(reference, labels)])
    assert acc_norm == np.mean([np.argmax([s / k for s, k in r]) == y for r, y in zip(reference, labels)])


def test_hellaswag_on_1_and_2_processes_and_after_training(saved_run, plugin_env):
    # the tool on the final checkpoint, in 1 and 2 processes (packs of 512 tokens and of the run's 1024), and the
    # line --run_evals=1 appended to the run's log after its summary: the same accuracies
    d = saved_run[0]
    args = ["logs/run/state_step000007.pt", "--data=hellaswag.jsonl", "--encoding=evals_tiny"]
    line = r"(hellaswag acc:\d\.\d{4} acc_norm:\d\.\d{4} items:30) seconds:\d+\.\d"
    found = []
    for world, extra in [(1, ["--seq_len=512"]), (2, ["--seq_len=512"]), (1, [])]:
        r = run_tool(HELLASWAG, args + extra, d, world, env=plugin_env)
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.fullmatch(line + "\n", r.stdout)
        assert m, r.stdout
        found.append(m[1])
    body = open(d / "logs/run.txt").read().split("=" * 100 + "\n")[-1].splitlines()
    assert body[-2].startswith("summary val_loss:") and re.fullmatch(line, body[-1]), body[-2:]
    assert found[0] == found[1] == found[2] == re.fullmatch(line, body[-1])[1]


def test_hellaswag_refuses_bad_data_with_one_line(saved_run, plugin_env, tmp_path, monkeypatch):
    d, final = saved_run[0], "logs/run/state_step000007.pt"
    good = json.dumps(dict(ctx="a b", endings=["c", "d", "e", "f"], label="1"))
    bad = {"json": "{not json", "three": json.dumps(dict(ctx="a", endings=["b", "c", "d"], label=0)),
           "label": json.dumps(dict(ctx="a", endings=["b", "c", "d", "e"], label=4)),
           "keys": json.dumps(dict(context="a", endings=["b", "c", "d", "e"], label=0))}
    cases = []
    for name, line in bad.items():
        (tmp_path / f"{name}.jsonl").write_text(good + "\n" + line + "\n")
        cases.append(([final, f"--data={tmp_path / name}.jsonl"], f"{tmp_path / name}.jsonl:2:"))
    cases += [([final, "--data=nope.jsonl"], "nope.jsonl: cannot be read"),
              ([final, "--data=x", "--seq_len=64"], "--seq_len=64: at least one block"),
              ([final], "hub_copy/hellaswag_val.jsonl: missing, and HF_HUB_OFFLINE is set"),  # no --data: the Hub's
              (["nope.pt"], "nope.pt: no such file")]  # which is fetched only for a checkpoint that loads
    monkeypatch.setattr(hellaswag.hellaswag_data, "DEFAULT_DIR", str(tmp_path / "hub_copy"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    refusals(hellaswag, HELLASWAG, cases, d, monkeypatch, plugin_env)
    # past the data, with the plugin encoding (in a process of its own: tiktoken finds plugins once)
    tool = [final, "--data=hellaswag.jsonl", "--encoding=evals_tiny"]  # the run's 30 items; its model takes 1024
    assert "--seq_len=2048: at most 1024" in one_line(run_tool(HELLASWAG, tool + ["--seq_len=2048"], d,
                                                               env=plugin_env))
    assert "more than a pack of 128: raise --seq_len" in one_line(run_tool(HELLASWAG, tool + ["--seq_len=128"], d,
                                                                           env=plugin_env))


def test_hellaswag_without_data_reads_the_hub_copy(tmp_path, monkeypatch):
    # no --data: data/hellaswag/hellaswag_val.jsonl (here a folder of the test's), complete, so no network is asked
    items = [(f"a context {i}", [f"ending {i} {k}" for k in range(4)], i % 4) for i in range(10042)]
    (tmp_path / "hub_copy").mkdir()
    write_items(tmp_path / "hub_copy" / "hellaswag_val.jsonl", items)
    monkeypatch.setattr(hellaswag.hellaswag_data, "DEFAULT_DIR", str(tmp_path / "hub_copy"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert hellaswag.load_items(None) == items
    assert hellaswag.parse(["x.pt"])[1]["data"] is None


def test_run_evals_checks_its_data_before_training(gpt_files, plugin_env, tmp_path):
    # a missing file or an encoding tiktoken cannot load: one line before the log exists; neither matters without it
    flags = gpt_files + TINY + ["--num_iterations=2", "--num_extension_iterations=1", "--eval_encoding=evals_tiny"]
    write_items(tmp_path / "h.jsonl", random_items(3))
    cases = [(["--run_evals=1", "--hellaswag_data=nope.jsonl"], "--hellaswag_data=nope.jsonl: cannot be read"),
             (["--run_evals=1", "--hellaswag_data=h.jsonl", "--eval_encoding=no_such"],
              "--eval_encoding=no_such: tiktoken cannot load it"),
             (["--run_evals=0", "--hellaswag_data=nope.jsonl", "--eval_encoding=no_such"], None)]
    hub_copy = os.path.join(ROOT, "data", "hellaswag", "hellaswag_val.jsonl")
    if not os.path.exists(hub_copy):  # no --hellaswag_data: the Hub's copy, which cannot come offline
        cases.append((["--run_evals=1"], f"{hub_copy}: missing, and HF_HUB_OFFLINE is set"))
    for i, (extra, words) in enumerate(cases):
        r = run_cli(flags + extra + [f"--run_id=x{i}"], tmp_path, env=dict(plugin_env, HF_HUB_OFFLINE="1"))
        if words is None:
            assert r.returncode == 0, r.stderr[-2000:]
            continue
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr[-2000:]
        assert not os.path.exists(tmp_path / "logs" / f"x{i}.txt")
