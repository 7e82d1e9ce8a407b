"""data/: the FineWeb downloader against a loopback Hub, and the tokenizer for one's own text."""
import gzip, hashlib, json, os, pathlib, re, runpy, shutil, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import numpy as np
import pytest
import tiktoken

from data import tokenize_text
from tests.gptdata import write_tiktoken_plugin
from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWNLOADER = os.path.join(ROOT, "data", "cached_fineweb10B.py")
TOKENIZER = os.path.join(ROOT, "data", "tokenize_text.py")
TOKEN = "hf_loopback_test_token"
EOT = 50256

# ---------------------------------------------------------------- helpers

def make_shard(n_tokens, seed):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, n_tokens
    return header.tobytes() + np.random.default_rng(seed).integers(0, 50257, n_tokens).astype("<u2").tobytes()

def read_shard(path):
    """Independent reader: checks the contract, returns the tokens."""
    raw = pathlib.Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any(), path
    assert len(raw) == 1024 + 2 * int(header[2]), path
    return np.frombuffer(raw[1024:], dtype="<u2")

def one_error_line(result):
    """The run failed with exactly one line on stderr and no traceback; return that line."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]

class LoopbackHub:
    """Serves the Hub's file protocol on 127.0.0.1: HEAD/GET /datasets/{repo}/resolve/{revision}/{file path},
    with the headers hf_hub_download reads (X-Repo-Commit, ETag, Content-Length, X-Error-Code on 404).
    `cut[file] = n`: the next GET of that file sends n bytes of its body and closes, and every request after it gets
    503 until `down` is False again; `drop[file] = n` the same with the Hub still up. `slow[file] = s`: every GET of
    that file waits s seconds before its body. Records every request; shuts itself down after 120 s at the latest."""

    def __init__(self, repos):
        self.repos, self.requests, self.cut, self.drop, self.down, self.slow = repos, [], {}, {}, False, {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.reply(self, body=False)
            def do_GET(self):
                hub.reply(self, body=True)
            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.timer = threading.Timer(120, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def reply(self, h, body):
        self.requests.append((h.command, h.path, h.headers.get("Authorization")))
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)", h.path)
        files = self.repos.get(m.group(1)) if m else None
        data = files.get(m.group(3)) if files is not None else None
        if self.down:
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200 if data is not None else 404)
        pinned = re.fullmatch(r"[0-9a-f]{40}", m.group(2)) if m else None  # a commit asked for is the one served
        h.send_header("X-Repo-Commit", m.group(2) if pinned else "0123456789abcdef0123456789abcdef01234567")
        if data is None:
            h.send_header("X-Error-Code", "EntryNotFound" if files is not None else "RepoNotFound")
            h.send_header("Content-Length", "0")
        else:
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body and data is not None:
            time.sleep(self.slow.get(m.group(3), 0))
            cut, drop = self.cut.pop(m.group(3), None), self.drop.pop(m.group(3), None)
            h.wfile.write(data[:cut if cut is not None else drop])
            h.close_connection = True
            self.down = cut is not None

    def gets(self):
        return sorted(path.rsplit("/", 1)[1] for method, path, _ in self.requests if method == "GET")

    def stop(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

FW = {"fineweb_val_000000.bin": make_shard(700, 0),
      **{f"fineweb_train_{i:06d}.bin": make_shard(400 + 100 * i, i) for i in range(1, 4)}}
EDU = {"finewebedu_val_000000.bin": make_shard(300, 10), "finewebedu_train_000001.bin": make_shard(500, 11)}

@pytest.fixture
def hub():
    h = LoopbackHub({"kjj0/fineweb10B-gpt2": dict(FW), "kjj0/finewebedu10B-gpt2": dict(EDU)})
    yield h
    h.stop()

def hub_env(tmp_path, endpoint, **extra):  # a client of the loopback Hub only: no proxy, no Hub variable of ours
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "HUGGINGFACE_")) and "PROXY" not in k.upper()}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_CACHE=str(tmp_path / "hf_cache"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1", **extra)
    return env

def download(tmp_path, endpoint, *args, script=DOWNLOADER, **extra_env):
    env = hub_env(tmp_path, endpoint, **extra_env)
    return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=HANG_S)

def bins(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".bin")) if os.path.isdir(folder) else []

# ---------------------------------------------------------------- downloader

def test_fresh_download_then_second_run_needs_no_network(hub, tmp_path):
    out = tmp_path / "out"
    r = download(tmp_path, hub.url, "2", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    wanted = ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    assert bins(out) == wanted and hub.gets() == wanted
    for name in wanted:
        assert (out / name).read_bytes() == FW[name]
        read_shard(out / name)
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}  # HF_TOKEN reaches the Hub
    assert not list((tmp_path / "hf_cache").rglob("*.bin"))  # nothing lands in the Hub cache
    hub.requests.clear()
    r = download(tmp_path, hub.url, "2", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    assert hub.requests == []  # complete files are skipped without asking the Hub
    assert all((out / name).read_bytes() == FW[name] for name in wanted)

def test_truncated_corrupt_and_missing_shards_are_repaired(hub, tmp_path):
    out = tmp_path / "out"
    assert download(tmp_path, hub.url, "3", "--dir", str(out)).returncode == 0
    with open(out / "fineweb_train_000001.bin", "r+b") as f:  # interrupted: the client's ETag metadata still matches
        f.truncate(len(FW["fineweb_train_000001.bin"]) - 100)
    with open(out / "fineweb_train_000002.bin", "r+b") as f:  # right size, wrong magic
        f.write(np.array([12345], dtype="<i4").tobytes())
    os.remove(out / "fineweb_train_000003.bin")
    hub.requests.clear()
    r = download(tmp_path, hub.url, "3", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    assert hub.gets() == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert not any("val" in path for _, path, _ in hub.requests)
    assert bins(out) == sorted(FW) and all((out / name).read_bytes() == FW[name] for name in FW)

def test_server_gone(hub, tmp_path):
    out = tmp_path / "out"
    assert download(tmp_path, hub.url, "2", "--dir", str(out)).returncode == 0
    hub.stop()
    os.remove(out / "fineweb_train_000002.bin")
    line = one_error_line(download(tmp_path, hub.url, "2", "--dir", str(out)))
    assert "fineweb_train_000002.bin" in line
    assert bins(out) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    with open(out / "fineweb_train_000001.bin", "r+b") as f:  # a partial shard is not left behind
        f.truncate(5000)
    line = one_error_line(download(tmp_path, hub.url, "2", "--dir", str(out)))
    assert "fineweb_train_000001.bin" in line
    assert bins(out) == ["fineweb_val_000000.bin"]
    assert (out / "fineweb_val_000000.bin").read_bytes() == FW["fineweb_val_000000.bin"]

def test_shard_missing_on_the_hub(hub, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(download(tmp_path, hub.url, "4", "--dir", str(out)))
    assert "fineweb_train_000004.bin" in line
    assert bins(out) == sorted(FW) and all((out / name).read_bytes() == FW[name] for name in FW)

def test_invalid_shard_from_the_hub_is_deleted(hub, tmp_path):
    out = tmp_path / "out"
    bad = bytearray(FW["fineweb_train_000001.bin"])
    bad[8:12] = np.array([10**6], dtype="<i4").tobytes()  # header claims more tokens than the file holds
    hub.repos["kjj0/fineweb10B-gpt2"]["fineweb_train_000001.bin"] = bytes(bad)
    line = one_error_line(download(tmp_path, hub.url, "2", "--dir", str(out)))
    assert "fineweb_train_000001.bin" in line
    assert bins(out) == ["fineweb_val_000000.bin"]

def test_edu_set_into_the_default_folder(hub, tmp_path):
    script = tmp_path / "data" / "cached_fineweb10B.py"  # a copy, so the default folder is beside it in tmp
    script.parent.mkdir()
    shutil.copy(DOWNLOADER, script)
    r = download(tmp_path, hub.url, "1", "--set", "finewebedu10B", script=str(script))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "finewebedu10B"
    assert bins(out) == sorted(EDU) and all((out / name).read_bytes() == EDU[name] for name in EDU)
    assert all(path.startswith("/datasets/kjj0/finewebedu10B-gpt2/resolve/main/") for _, path, _ in hub.requests)

@pytest.mark.parametrize("args,named", [(["104"], "104"), (["abc"], "abc"), (["-1"], "-1"),
                                        (["5", "--set", "fw1B"], "fw1B")])
def test_bad_arguments(hub, tmp_path, args, named):
    line = one_error_line(download(tmp_path, hub.url, *args, "--dir", str(tmp_path / "out")))
    assert line.startswith("error:") and named in line
    assert hub.requests == [] and not (tmp_path / "out").exists()

# ---------------------------------------------------------------- HellaSwag downloader

HELLASWAG = os.path.join(ROOT, "data", "hellaswag.py")
HS_PARQUET = "data/validation-00000-of-00001.parquet"  # Rowan/hellaswag's validation split on the Hub
# the official hellaswag_val.jsonl's keys in its order (an item as rowanz/hellaswag published it)
OFFICIAL_KEYS = ["ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings",
                 "source_id"]

def hellaswag_rows(n=10042, seed=0):
    """n rows with the Hub's columns (label a string, as the Hub has it), some of the text not ASCII."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join("".join(rng.choice(list("abcdéfgh“”"), rng.integers(1, 6))) for _ in range(k))
    rows = []
    for i in range(n):
        ctx_a, ctx_b = words(rng.integers(2, 9)), words(rng.integers(0, 3))
        rows.append(dict(ind=i, activity_label=words(2), ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}".strip(),
                         endings=[words(rng.integers(1, 7)) for _ in range(4)], source_id=f"wikihow~{i}",
                         split="val", split_type=["indomain", "zeroshot"][i % 2], label=str(rng.integers(4))))
    return rows

def parquet_bytes(rows):
    import pyarrow as pa, pyarrow.parquet as pq
    schema = pa.schema([("ind", pa.int32()), *[(k, pa.string()) for k in ["activity_label", "ctx_a", "ctx_b", "ctx"]],
                        ("endings", pa.list_(pa.string())), *[(k, pa.string()) for k in ["source_id", "split",
                                                                                        "split_type", "label"]]])
    schema = pa.schema([field for field in schema if field.name in rows[0]])
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue().to_pybytes()

HS_ROWS = hellaswag_rows()

@pytest.fixture(scope="module")
def hs_parquet():
    return parquet_bytes(HS_ROWS)

@pytest.fixture
def hs_hub(hs_parquet):
    h = LoopbackHub({"Rowan/hellaswag": {HS_PARQUET: hs_parquet}})
    yield h
    h.stop()

def official_lines(rows):  # what the official file holds for these rows: its keys in order, label a number
    return [json.dumps({k: int(row[k]) if k == "label" else row[k] for k in OFFICIAL_KEYS}) for row in rows]

def leftovers(folder):  # every file but the empty .lock and the Hub client's own bookkeeping under .cache/
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*")
                  if p.is_file() and ".cache" not in p.parts and p.relative_to(folder).parts != (".lock",))

def test_hellaswag_download_by_two_processes_then_no_network(hs_hub, tmp_path):
    out = tmp_path / "out"
    hs_hub.slow[HS_PARQUET] = 3  # the second process asks while the first is still downloading
    both = [subprocess.Popen([sys.executable, HELLASWAG, "--dir", str(out)], env=hub_env(tmp_path, hs_hub.url),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # e.g. the ranks of torchrun
    for p in both:
        stdout, stderr = p.communicate(timeout=HANG_S)
        assert p.returncode == 0, stderr
        assert stdout == f"{out / 'hellaswag_val.jsonl'}: 10042 HellaSwag validation items\n"
    lines = (out / "hellaswag_val.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == official_lines(HS_ROWS)
    assert [list(json.loads(line)) for line in lines[:3]] == [OFFICIAL_KEYS] * 3
    assert leftovers(out) == ["data/validation-00000-of-00001.parquet", "hellaswag_val.jsonl"]
    pinned = r"/datasets/Rowan/hellaswag/resolve/[0-9a-f]{40}/data/validation-00000-of-00001\.parquet"
    assert all(re.fullmatch(pinned, path) for _, path, _ in hs_hub.requests)  # a commit, not a moving branch
    assert {auth for _, _, auth in hs_hub.requests} == {f"Bearer {TOKEN}"}
    assert [method for method, _, _ in hs_hub.requests].count("GET") == 1  # the other process waited for it
    hs_hub.requests.clear()
    assert download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG).returncode == 0
    assert hs_hub.requests == []  # a complete file: no network
    (out / "hellaswag_val.jsonl").write_text("\n".join(lines[:-5]) + "\n")  # 5 items short: written again
    r = download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG)
    assert r.returncode == 0, r.stderr
    assert (out / "hellaswag_val.jsonl").read_text(encoding="utf-8").splitlines() == lines
    assert hs_hub.gets() == []  # from the Parquet file already there, after the Hub said it is current

def test_hellaswag_interrupted_download_leaves_nothing_then_completes(hs_hub, tmp_path, hs_parquet):
    out = tmp_path / "out"
    hs_hub.cut[HS_PARQUET] = len(hs_parquet) // 2  # half the file, then the Hub is unavailable
    line = one_error_line(download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG))
    assert line.startswith("error: could not download data/validation-00000-of-00001.parquet of Rowan/hellaswag")
    assert leftovers(out) == []
    hs_hub.down = False
    assert download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG).returncode == 0
    assert (out / "hellaswag_val.jsonl").read_text(encoding="utf-8").splitlines() == official_lines(HS_ROWS)

def test_hellaswag_dropped_connection_is_retried_in_the_same_run(hs_hub, tmp_path, hs_parquet):
    hs_hub.drop[HS_PARQUET] = len(hs_parquet) // 2  # the connection closes halfway; the Hub stays up
    out = tmp_path / "out"
    r = download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG)
    assert r.returncode == 0, r.stderr
    # The same run asks again. (huggingface-hub resumes from the bytes it has written, in 10 MiB chunks: for the real
    # file of 6.3 MB, and this one, that is none, so its second request is for the whole file.)
    assert hs_hub.gets() == [HS_PARQUET.rsplit("/", 1)[1]] * 2
    assert (out / "hellaswag_val.jsonl").read_text(encoding="utf-8").splitlines() == official_lines(HS_ROWS)

WRONG_FILES = {  # what the Hub might serve instead, and what the error names
    "garbage": (lambda: b"PAR1 not a Parquet file", "ArrowInvalid"),
    "short": (lambda: parquet_bytes(HS_ROWS[:-1]), "10041 items, want 10042"),
    "label": (lambda: parquet_bytes(HS_ROWS[:7] + [dict(HS_ROWS[7], label="4")] + HS_ROWS[8:]),
              "row 8: want a ctx string"),
    "no_endings": (lambda: parquet_bytes([{k: v for k, v in row.items() if k != "endings"} for row in HS_ROWS]),
                   "row 1: not a HellaSwag item"),
}

@pytest.mark.parametrize("wrong", WRONG_FILES)
def test_hellaswag_wrong_file_from_the_hub_is_deleted(tmp_path, wrong):
    make, named = WRONG_FILES[wrong]
    served = make()
    hub = LoopbackHub({"Rowan/hellaswag": {HS_PARQUET: served}})
    try:
        line = one_error_line(download(tmp_path, hub.url, "--dir", str(tmp_path / "out"), script=HELLASWAG))
    finally:
        hub.stop()
    assert "is not HellaSwag's validation set" in line and named in line and "deleted it" in line, line
    assert leftovers(tmp_path / "out") == []

def test_hellaswag_offline_server_gone_not_on_the_hub_and_no_pyarrow(hs_hub, tmp_path):
    out = tmp_path / "out"
    offline = download(tmp_path, "http://127.0.0.1:9", "--dir", str(out), script=HELLASWAG, HF_HUB_OFFLINE="1")
    assert "missing, and HF_HUB_OFFLINE is set; unset it to download" in one_error_line(offline)
    block = tmp_path / "no_pyarrow.py"  # the script as a process without pyarrow sees it
    block.write_text(f"import runpy, sys\nsys.modules['pyarrow'] = None\nsys.argv[0] = {HELLASWAG!r}\n"
                     f"runpy.run_path({HELLASWAG!r}, run_name='__main__')\n")
    line = one_error_line(download(tmp_path, hs_hub.url, "--dir", str(out), script=str(block)))
    assert "needs pyarrow: pip install pyarrow" in line and hs_hub.requests == []
    assert download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG).returncode == 0
    hs_hub.stop()
    for script, extra in [(HELLASWAG, dict(HF_HUB_OFFLINE="1")), (str(block), {})]:  # a complete file needs neither
        r = download(tmp_path, hs_hub.url, "--dir", str(out), script=script, **extra)
        assert r.returncode == 0, r.stderr
    os.remove(out / "hellaswag_val.jsonl")  # offline, the Parquet file downloaded before is enough
    assert download(tmp_path, hs_hub.url, "--dir", str(out), script=HELLASWAG, HF_HUB_OFFLINE="1").returncode == 0
    empty = LoopbackHub({"Rowan/hellaswag": {}})  # (a Hub out of reach: huggingface-hub retries for 24 s first)
    try:
        line = one_error_line(download(tmp_path, empty.url, "--dir", str(tmp_path / "elsewhere"), script=HELLASWAG))
    finally:
        empty.stop()
    assert line.startswith("error: could not download") and "404 Not Found" in line, line
    (tmp_path / "file").write_text("x")
    assert "not a folder" in one_error_line(download(tmp_path, hs_hub.url, "--dir", str(tmp_path / "file"),
                                                     script=HELLASWAG))
    line = one_error_line(download(tmp_path, hs_hub.url, "--dir", str(tmp_path / "file" / "sub"), script=HELLASWAG))
    assert line.endswith("sub: cannot write there (NotADirectoryError); name a folder you can write"), line

# ---------------------------------------------------------------- tokenizer

# A small byte-level BPE with a few merges, <|endoftext|> at GPT-2's id; also a tiktoken plugin for the CLI.
PLUGIN = r'''
def tiny(big_id=False):
    ranks = {bytes([i]): i for i in range(256)}
    for i, merge in enumerate([b"th", b"he", b"the", b"in", b" t", b" the", b"er", b"an", b"\xc3\xa9"]):
        ranks[merge] = 256 + i
    if big_id:
        ranks[b"zz"] = 70000
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return dict(name="tiny_test", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
ENCODING_CONSTRUCTORS = {"tiny_test": tiny}
'''

@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    return write_tiktoken_plugin(tmp_path_factory.mktemp("plugin"), "speedrun_tiny_test", PLUGIN)

@pytest.fixture(scope="module")
def enc(plugin_dir):
    return tiktoken.Encoding(**runpy.run_path(str(plugin_dir / "tiktoken_ext" / "speedrun_tiny_test.py"))["tiny"]())

WORDS = "the then there in inn thin ant banter é café naïve 42 ✓ <|endoftext|> it's ,.;!".split()

def make_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 60)))) + "\n" * int(rng.integers(0, 2)) for _ in range(n)]

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .txt / .jsonl / .jsonl.gz files (and a file to ignore); returns (folder, docs in order)."""
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(40, 0)
    (d / "a").mkdir()
    (d / "a" / "1.txt").write_text(docs[0], encoding="utf-8")
    (d / "a" / "2.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[1:20]))
                                     + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[20:39])
    (d / "c.txt").write_text(docs[39], encoding="utf-8")
    (d / "notes.md").write_text("not part of the corpus")
    return d, docs

def split_docs(tokens, enc):
    """Decode a token stream into documents at every <|endoftext|>; each must start one."""
    starts = np.flatnonzero(tokens == EOT)
    assert len(starts) and starts[0] == 0
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]

def test_round_trip_and_val_train_split(corpus, enc, tmp_path):
    folder, docs = corpus
    paths = tokenize_text.tokenize([str(folder)], str(tmp_path), enc, prefix="t", shard_size=300, val_tokens=250)
    lengths = np.array([1 + len(enc.encode_ordinary(d)) for d in docs])
    n_val = int(np.searchsorted(np.cumsum(lengths), 250)) + 1  # documents that hold the first 250 tokens
    n_train = int(lengths[n_val:].sum())
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths) == \
        sorted(["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, -(-n_train // 300) + 1)])
    val = read_shard(tmp_path / "t_val_000000.bin")
    assert split_docs(val, enc) == docs[:n_val] and len(val) >= 250
    train = [read_shard(tmp_path / f"t_train_{i:06d}.bin") for i in range(1, len(paths))]
    assert all(len(t) == 300 for t in train[:-1]) and 0 < len(train[-1]) <= 300
    assert split_docs(np.concatenate(train), enc) == docs[n_val:]

def test_same_output_for_any_worker_count_and_the_cli(corpus, enc, plugin_dir, tmp_path):
    folder, _ = corpus
    tokenize_text.tokenize([str(folder)], str(tmp_path / "one"), enc, shard_size=200, val_tokens=100, workers=1)
    env = dict(os.environ, PYTHONPATH=str(plugin_dir))
    r = subprocess.run([sys.executable, TOKENIZER, str(folder), "--out", str(tmp_path / "two"), "--shard_size", "200",
                        "--val_tokens", "100", "--workers", "2", "--encoding", "tiny_test"],
                       env=env, capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    names = os.listdir(tmp_path / "one")
    assert len(names) > 3 and sorted(os.listdir(tmp_path / "two")) == sorted(names)
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)

@pytest.mark.parametrize("mode,sep", [("paragraph", "\n\n"), ("line", "\n")])
def test_text_file_split_into_documents(enc, tmp_path, mode, sep):
    docs = [d.replace("\n", " ").strip() for d in make_docs(12, 1)]
    (tmp_path / "in.txt").write_text(sep.join(docs), encoding="utf-8")
    tokenize_text.tokenize([str(tmp_path / "in.txt")], str(tmp_path / "out"), enc, val_tokens=1, txt_docs=mode)
    assert sorted(os.listdir(tmp_path / "out")) == ["text_train_000001.bin", "text_val_000000.bin"]
    val, train = (split_docs(read_shard(tmp_path / "out" / f"text_{name}.bin"), enc)
                  for name in ("val_000000", "train_000001"))
    assert val == docs[:1] and train == docs[1:]  # the first whole document holds the one val token asked for

def test_token_id_that_does_not_fit_uint16(plugin_dir, tmp_path):
    plugin = runpy.run_path(str(plugin_dir / "tiktoken_ext" / "speedrun_tiny_test.py"))
    big = tiktoken.Encoding(**plugin["tiny"](big_id=True))
    lines = [json.dumps({"text": t}) for t in ["the thin ant " * 20, "banter", "a buzzword", "more"]]
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    with pytest.raises(tokenize_text.TokenizeError, match=r"in\.jsonl:3: token id 70000 .*65536"):
        tokenize_text.tokenize([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), big, shard_size=20, val_tokens=30)
    assert os.listdir(tmp_path / "out") == []  # the val and train shards written before are gone

def test_cli_bad_input_is_one_line(corpus, plugin_dir, tmp_path):
    folder, _ = corpus
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "text_train_000007.bin").write_bytes(b"")
    cases = [([str(tmp_path / "nope.txt")], "nope.txt"),
             ([str(tmp_path / "bad.jsonl"), "--val_tokens", "1"], "bad.jsonl:2"),
             ([str(folder), "--val_tokens", "0"], "--val_tokens >= 1"),
             ([str(folder), "--val_tokens", "100000"], "--val_tokens"),
             ([str(folder), "--out", str(tmp_path / "old")], "text_*.bin"),
             ([str(folder), "--shard_size", "0"], "--shard_size"),
             ([str(tmp_path / "empty.txt")], "no documents"),
             ([str(tmp_path / "latin1.txt")], "latin1.txt: not UTF-8")]
    env = dict(os.environ, PYTHONPATH=str(plugin_dir))
    for args, named in cases:
        out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
        r = subprocess.run([sys.executable, TOKENIZER, *args, *out, "--encoding", "tiny_test", "--workers", "1"],
                           env=env, capture_output=True, text=True, timeout=HANG_S)
        assert named in one_error_line(r), r.stderr
    assert bins(tmp_path / "out") == [] and os.listdir(tmp_path / "old") == ["text_train_000007.bin"]

@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])  # --out names a file, or a folder inside one
def test_out_that_is_not_a_folder_is_one_line(corpus, plugin_dir, tmp_path, out):
    folder, _ = corpus
    (tmp_path / "a_file").write_text("keep me")
    r = subprocess.run([sys.executable, TOKENIZER, str(folder), "--out", str(tmp_path / out), "--encoding", "tiny_test",
                        "--workers", "1", "--val_tokens", "100"], env=dict(os.environ, PYTHONPATH=str(plugin_dir)),
                       capture_output=True, text=True, timeout=HANG_S)
    line = one_error_line(r)
    assert "--out" in line and str(tmp_path / out) in line, line
    assert (tmp_path / "a_file").read_text() == "keep me"
