import os, sys
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest

@pytest.fixture(scope="session")
def gpt_files(tmp_path_factory):
    """--train_files / --val_files flags of a small learnable corpus (tests/gptdata.py), shared by the GPT tests."""
    from tests.gptdata import write_corpus
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(str(d), train_tokens=300_000, val_tokens=20_000)
    return [f"--train_files={d}/fineweb_train_*.bin", f"--val_files={d}/fineweb_val_000000.bin"]
