"""HellaSwag's 10,042 validation items from the Hugging Face Hub, written as the official hellaswag_val.jsonl.

    python data/hellaswag.py                        # -> data/hellaswag/hellaswag_val.jsonl
    python data/hellaswag.py --dir /scratch/hellaswag

evals/hellaswag.py and train_gpt.py --run_evals=1 read data/hellaswag/hellaswag_val.jsonl by default and call this
first. GitHub has disabled the official file's home (rowanz/hellaswag, a DMCA notice of 14 September 2026); the Hub's
Rowan/hellaswag keeps the same items as one Parquet file, the copy public evaluations now read (modded-nanogpt's
evals/hellaswag.py loads it with the datasets library). This script downloads that file with huggingface-hub at a pinned
commit into the target folder (HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE work as usual; it retries a dropped connection;
an interrupted download leaves nothing that passes for complete, and the next run fetches the file again), reads it with
pyarrow (the one package it needs beyond requirements.txt: Parquet is a compressed columnar format) and writes one JSON
object a line with the official keys, label a number. Every row is checked, and their count, before the file takes its
name; a file that holds 10,042 valid items is used without any network access. Exit code 0 only when the file is
complete.
"""
import argparse, fcntl, json, os, sys

REPO, REVISION = "Rowan/hellaswag", "049e80830aedaee63cd025622acf83822eb46553"  # the commit that holds data/*.parquet
PARQUET, ITEMS = "data/validation-00000-of-00001.parquet", 10042
KEYS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id")
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


class DataError(Exception):
    """A HellaSwag file that cannot be read, fetched or trusted: its one line for the user."""


def parse_item(item):
    """(ctx, [4 endings], label) of one HellaSwag item (a dict, label a number or its string); a ValueError says what
    is wrong with it."""
    try:
        ctx, endings, label = item["ctx"], item["endings"], int(item["label"])
    except (KeyError, TypeError, ValueError) as e:
        why = f"not a HellaSwag item (a JSON object with ctx, endings and label; {type(e).__name__})"
        raise ValueError(why) from None
    if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) for e in endings) and 0 <= label < 4):
        raise ValueError("want a ctx string, 4 ending strings and a label 0-3")
    return ctx, endings, label


def read_items(path, flag=None):
    """[(ctx, [4 endings], label)] of a file in hellaswag_val.jsonl's format (any number of items); a bad line: a
    DataError naming `flag=path:line` (or the path alone)."""
    where = f"{flag}={path}" if flag else path
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(parse_item(json.loads(line)))
        except ValueError as e:  # json's errors too
            raise DataError(f"{where}:{number}: {e}") from None
    if not items:
        raise DataError(f"{where}: no items in it")
    return items


def problem(path):
    """None if `path` holds the 10,042 validation items, else what is wrong with it."""
    if not os.path.isfile(path):
        return "missing"
    try:
        n = len(read_items(path))
    except DataError as e:
        return str(e)
    return None if n == ITEMS else f"{n} items, want {ITEMS}"


def root_cause(e):  # the innermost exception says most (connection refused, 404, ...), on one line
    while e.__cause__ is not None:
        e = e.__cause__
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def write_jsonl(rows, path):
    """Rows (dicts with the Hub's columns) as hellaswag_val.jsonl's lines; a ValueError names a bad row or count."""
    if len(rows) != ITEMS:
        raise ValueError(f"{len(rows)} items, want {ITEMS}")
    with open(path, "w", encoding="utf-8") as f:
        for number, row in enumerate(rows, 1):
            item = {key: row[key] for key in KEYS if key in row}
            try:
                item["label"] = parse_item(item)[2]  # the official file's label is a number, the Hub's a string
            except ValueError as e:
                raise ValueError(f"row {number}: {e}") from None
            f.write(json.dumps(item) + "\n")


def fetch(folder=None):
    """The path of folder/hellaswag_val.jsonl (default: data/hellaswag/), downloaded and written first unless it is
    complete. Any number of processes may call it at once (the ranks of torchrun): one downloads and writes under a
    lock on folder/.lock, the others wait for it and then find the file complete."""
    folder = folder or DEFAULT_DIR
    path = os.path.join(folder, "hellaswag_val.jsonl")
    why = problem(path)
    if why is None:
        return path
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder; name a folder for HellaSwag's file")
    try:  # before any download
        import pyarrow.parquet
    except ImportError:
        raise DataError("reading the Hub's Parquet copy of HellaSwag needs pyarrow: pip install pyarrow (or pass a "
                        "local hellaswag_val.jsonl)") from None
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a")
    except OSError as e:
        raise DataError(f"{folder}: cannot write there ({type(e).__name__}); name a folder you can write") from None
    with lock:
        # The Hub client locks only its transfer: a second caller that looked before the first had finished deletes
        # and fetches the file again while the first reads it. So the whole fetch is locked, here.
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, by the kernel if this process dies
        why = problem(path)
        return path if why is None else download_and_write(folder, path, why)


def download_and_write(folder, path, why):  # fetch's work, under its lock
    import pyarrow.parquet
    from huggingface_hub import constants, hf_hub_download, logging
    logging.set_verbosity_error()  # its warnings (a retried transfer) are not the user's business; errors say below
    try:  # offline, a Parquet file downloaded before is still used
        parquet = hf_hub_download(repo_id=REPO, repo_type="dataset", filename=PARQUET, revision=REVISION,
                                  local_dir=folder)
    except Exception as e:
        if constants.HF_HUB_OFFLINE:
            raise DataError(f"{path}: {why}, and HF_HUB_OFFLINE is set; unset it to download HellaSwag from "
                            f"{REPO}") from None
        raise DataError(f"could not download {PARQUET} of {REPO} from {constants.ENDPOINT} ({root_cause(e)}); check "
                        "the network, HF_ENDPOINT and HF_TOKEN, then rerun") from None
    written = f"{path}.{os.getpid()}.tmp"
    try:
        write_jsonl(pyarrow.parquet.read_table(parquet).to_pylist(), written)
    except Exception as e:  # not Parquet, not HellaSwag's columns or not its 10,042 items
        for stale in (written, parquet):
            if os.path.exists(stale):
                os.remove(stale)
        raise DataError(f"downloaded {parquet} is not HellaSwag's validation set ({root_cause(e)}); deleted it, "
                        "rerun to retry") from None
    os.replace(written, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=DEFAULT_DIR, help="target folder (default: data/hellaswag/ beside this file)")
    parser.error = lambda msg: sys.exit(f"error: {msg} (see --help)")  # one line, no usage block
    args = parser.parse_args()
    try:
        path = fetch(args.dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted; rerun to finish")
    print(f"{path}: {ITEMS} HellaSwag validation items")


if __name__ == "__main__":
    main()
