"""Tokenize your own text into shards of the FineWeb format (256 int32 header, then uint16 token ids).

    python data/tokenize_text.py my_corpus/ --out data/mytext        # a folder of .txt / .jsonl (.gz too)
    python data/tokenize_text.py a.jsonl b.txt --out data/mytext --txt_docs paragraph --val_tokens 1000000

Documents come in order: the inputs as given, a folder's files in sorted path order, a file's documents in
order. A .jsonl file holds one document per line (its "text" field); a text file is one document, or one per
paragraph / line with --txt_docs. Blank documents are skipped. Each document becomes [<|endoftext|>] + its
tokens. Whole documents go to {prefix}_val_000000.bin until it holds at least --val_tokens tokens; the rest
fill {prefix}_train_000001.bin, 000002, ... with exactly --shard_size tokens each (documents run on across
shard ends, the last shard holds the remainder). The output is the same for any --workers.
"""
import argparse, contextlib, glob, gzip, itertools, json, os, re, sys
from multiprocessing import Pool
import numpy as np

MAGIC, VERSION = 20240520, 1
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")

class TokenizeError(ValueError):
    """Bad input: the message names the file and what is wrong."""

def find_files(inputs):
    files = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names if f.endswith(SUFFIXES))
            if not found:
                raise TokenizeError(f"{p}: no {' / '.join(SUFFIXES)} files in this folder")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise TokenizeError(f"{p}: no such file or folder")
    return files

def documents(files, txt_docs):
    """Yield (where, text) for every document that is not blank."""
    for path in files:
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                if path.endswith((".jsonl", ".jsonl.gz")):
                    for i, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                text = json.loads(line)["text"]
                            except (ValueError, KeyError, TypeError):
                                raise TokenizeError(f'{path}:{i}: not a JSON object with a "text" field') from None
                            if not isinstance(text, str):
                                raise TokenizeError(f'{path}:{i}: "text" is not a string')
                            if text.strip():
                                yield f"{path}:{i}", text
                elif txt_docs == "file":
                    text = f.read()
                    if text.strip():
                        yield path, text
                else:
                    text = f.read()
                    pieces = re.split(r"\n\s*\n", text) if txt_docs == "paragraph" else text.splitlines()
                    for i, doc in enumerate(pieces, 1):
                        if doc.strip():
                            yield f"{path} ({txt_docs} {i})", doc
        except UnicodeDecodeError as e:
            raise TokenizeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:
            raise TokenizeError(f"{path}: {e}") from None

_enc = None
def _set_encoding(enc):
    global _enc
    _enc = enc

def _encode(item):
    where, text = item
    ids = np.array([_enc.eot_token] + _enc.encode_ordinary(text), dtype=np.int64)
    if ids.max() >= 2**16:
        raise TokenizeError(f"{where}: token id {ids.max()} does not fit in uint16 (shards hold ids < 65536); "
                            f"use an encoding with fewer than 65536 tokens, such as gpt2")
    return ids.astype(np.uint16)

def tokenize(inputs, out_dir, enc, prefix="text", shard_size=10**8, val_tokens=10_485_761, workers=1, txt_docs="file"):
    """Tokenize `inputs` (files and folders) with the tiktoken Encoding `enc` into shards in `out_dir`.
    Returns the paths written. Raises TokenizeError on bad input, leaving no shard behind."""
    if not 1 <= shard_size < 2**31 or val_tokens < 1 or workers < 1:  # a corpus without a val shard cannot be trained
        raise TokenizeError("need 1 <= --shard_size < 2**31, --val_tokens >= 1 and --workers >= 1")
    if "<|endoftext|>" not in enc.special_tokens_set:
        raise TokenizeError(f"encoding {enc.name} has no <|endoftext|> token to start documents with")
    docs = documents(find_files(inputs), txt_docs)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise TokenizeError(f"--out {out_dir}: not a folder, and none can be made there ({e.strerror})") from None
    if glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}_*.bin")):
        raise TokenizeError(f"{out_dir} already holds {prefix}_*.bin shards; remove them or choose another --out or "
                            "--prefix")

    written = []  # temporary names, renamed only once every shard is written
    def write(kind, index, tokens):
        if len(tokens) >= 2**31:
            raise TokenizeError(f"{kind} shard would hold {len(tokens)} tokens, more than the header's int32 allows")
        header = np.zeros(256, dtype="<i4")
        header[:3] = MAGIC, VERSION, len(tokens)
        path = os.path.join(out_dir, f"{prefix}_{kind}_{index:06d}.bin")
        written.append(path)
        with open(path + ".tmp", "wb") as f:
            header.tofile(f)
            tokens.astype("<u2").tofile(f)
        print(f"{path}: {len(tokens):,} tokens")

    try:
        with Pool(workers, _set_encoding, (enc,)) if workers > 1 else contextlib.nullcontext() as pool:
            _set_encoding(enc)
            val, n_val, n_docs = [], 0, 0
            buf, fill, n_train = np.empty(shard_size, dtype=np.uint16), 0, 0
            while batch := list(itertools.islice(docs, 1024 * workers)):  # bounded: imap would read all input
                for ids in (pool.imap(_encode, batch, chunksize=16) if pool else map(_encode, batch)):
                    n_docs += 1
                    if n_val < val_tokens:
                        val.append(ids)
                        n_val += len(ids)
                        if n_val >= val_tokens:
                            write("val", 0, np.concatenate(val))
                        continue
                    while len(ids):
                        take = min(shard_size - fill, len(ids))
                        buf[fill:fill + take] = ids[:take]
                        fill, ids = fill + take, ids[take:]
                        if fill == shard_size:
                            n_train += 1
                            write("train", n_train, buf)
                            fill = 0
            if fill:
                n_train += 1
                write("train", n_train, buf[:fill])
        if n_train == 0:
            raise TokenizeError("no documents in the inputs" if n_docs == 0 else f"only {n_val:,} tokens in {n_docs} "
                                f"documents, all for the val shard (--val_tokens {val_tokens:,}): lower --val_tokens "
                                "or add text")
        for path in written:
            os.replace(path + ".tmp", path)
        return written
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + ".tmp")
        raise

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text files, .jsonl files or folders of them")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", default="text",
                        help="shard names: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...")
    parser.add_argument("--shard_size", type=int, default=10**8, help="tokens per train shard (default 100M)")
    parser.add_argument("--val_tokens", type=int, default=10_485_761,
                        help="at least this many tokens in the val shard (default: the 10,485,760 + 1 that "
                        "train_gpt.py reads)")
    parser.add_argument("--txt_docs", choices=["file", "paragraph", "line"], default="file",
                        help="documents in a text file")
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding name (default gpt2)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1), help="tokenizer processes")
    parser.error = lambda msg: sys.exit(f"error: {msg} (see --help)")  # one line, no usage block
    args = parser.parse_args()
    import tiktoken
    try:
        enc = tiktoken.get_encoding(args.encoding)
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        sys.exit(f"error: cannot load tiktoken encoding {args.encoding!r} ({type(e).__name__}: {reason}); tiktoken "
                 "fetches its files once: run this where the network is up, or point TIKTOKEN_CACHE_DIR at them")
    try:
        paths = tokenize(args.inputs, args.out, enc, args.prefix, args.shard_size, args.val_tokens, args.workers,
                         args.txt_docs)
    except TokenizeError as e:
        sys.exit(f"error: {e}")
    print(f"{len(paths)} shards in {args.out}")

if __name__ == "__main__":
    main()
