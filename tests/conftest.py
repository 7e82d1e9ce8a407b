import os, sys
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# for the scripts the tests launch: glibc serves big blocks from its heap instead of fresh pages for each 50304-wide
# logits tensor (a tiny CPU run took 19 s with the default, 13 s with these)
os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2 ** 34))

import pytest

@pytest.fixture(scope="session")
def gpt_files(tmp_path_factory):
    """--train_files / --val_files flags of a small learnable corpus (tests/gptdata.py) in the small vocabulary (run it
    with gptdata.SMALL_VOCAB's flags), shared by the GPT tests."""
    from tests.gptdata import SMALL_BOS, write_corpus
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(str(d), train_tokens=300_000, val_tokens=20_000, bos=SMALL_BOS)
    return [f"--train_files={d}/fineweb_train_*.bin", f"--val_files={d}/fineweb_val_000000.bin"]

# every subprocess a test starts gets this timeout, a guard against a hang only: the longest (the records fixture's four
# runs side by side) takes about 30 s on an idle 2-core machine, so a healthy run on a machine loaded 10 times over
# still ends well inside it
HANG_S = 1800
