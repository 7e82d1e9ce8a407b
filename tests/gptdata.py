"""Shards and a learnable token corpus for the GPT tests (written here, independent of train_gpt.py)."""
import numpy as np

# the GPT tests' runs: a 520-row vocabulary whose document start is 512 (the toy documents use ids 0-511), so a CPU
# step does not spend most of its time on a 50,304-wide head and its tables; the record's sizes are tested apart
SMALL_BOS = 512
SMALL_VOCAB = ["--vocab_size=520", f"--bos_id={SMALL_BOS}"]

def write_shard(path, tokens, magic=20240520, version=1, n_tokens=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if n_tokens is None else n_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())

def learnable_docs(n_docs, seed, min_len=20, max_len=400, bos=50256):
    """Documents [bos, a, a+k, a+2k, ...] mod 512: the next token follows from the previous two."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n, a, k = rng.integers(min_len, max_len), rng.integers(0, 512), rng.integers(1, 17)
        docs.append(np.concatenate([[bos], (a + k * np.arange(n)) % 512]))
    return docs

def write_tiktoken_plugin(folder, module, source):
    """folder/tiktoken_ext/<module>.py holding source: with folder on PYTHONPATH tiktoken finds its encodings."""
    (folder / "tiktoken_ext").mkdir()
    (folder / "tiktoken_ext" / f"{module}.py").write_text(source)
    return folder

def write_corpus(folder, train_tokens=400_000, val_tokens=40_000, n_train_shards=2, seed=0, bos=50256):
    """Train shards fineweb_train_000001.. and fineweb_val_000000.bin in folder; returns their paths."""
    paths = []
    for i in range(n_train_shards):
        toks = np.concatenate(learnable_docs(max(1, train_tokens // n_train_shards // 210), seed + i + 1, bos=bos))
        paths.append(f"{folder}/fineweb_train_{i + 1:06d}.bin")
        write_shard(paths[-1], toks)
    val = np.concatenate(learnable_docs(max(1, val_tokens // 210), seed + 100, bos=bos))
    write_shard(f"{folder}/fineweb_val_000000.bin", val)
    return paths, f"{folder}/fineweb_val_000000.bin"
