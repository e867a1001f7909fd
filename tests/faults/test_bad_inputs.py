"""Fault injection, part 4: bad inputs get one clear message and a non-zero exit, never a traceback.

Each row: a command with a bad input, the exit code, and words the message must contain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from e2e_helpers import REPO

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models_root) -> Path:
    """A small tiny-world source, a copy whose captions are not UTF-8, and bad files."""
    from spo.config import load_config
    from spo.stages import synth

    root = tmp_path_factory.mktemp("bad_inputs")
    small = ["synthetic.train_rows=40", "synthetic.validation_rows=12", "synthetic.test_rows=4",
             "synthetic.unique_rows=4", "synthetic.train_shards=1"]
    synth.run(load_config("tiny", [f"paths.root={root}", "tracking.enabled=false", *small], params_file=None))
    good = root / "data" / "raw" / "pickapic_tiny"
    bad = root / "not_utf8"
    shutil.copytree(good, bad)
    shard = next((bad / "data").glob("train-*.parquet"))
    table = pq.read_table(shard)
    values = [c.encode() for c in table.column("caption").to_pylist()]
    values[3] = b"bad \xff\xfe caption"
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    captions = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", captions), shard)
    (root / "binary.yaml").write_bytes(b"\x00\x01\xff\xfe")
    (root / "a_dir").mkdir()
    (root / "not_a_lora.safetensors").write_text("this is not a safetensors file")
    shutil.copytree(tiny_models_root / "models" / "base", root / "models" / "base")
    return root


CASES = [
    ("params file is binary", ["config", "--params", "{root}/binary.yaml"], 2, "is not a text file"),
    ("params file is a directory", ["config", "--params", "{root}/a_dir"], 2, "is a directory"),
    ("params file does not exist", ["config", "--params", "{root}/nope.yaml"], 2, "does not exist"),
    ("unknown key", ["config", "--set", "spo.lrr=1"], 2, "spo.lrr: unknown key"),
    ("non-finite value", ["config", "--set", "spm.lr=.inf"], 2, "spm.lr"),
    ("malformed reference", ["config", "--set", "model.pretrained=org/name@"], 2, "model.pretrained"),
    ("captions not UTF-8", ["prepare", "--set", "data.source={root}/not_utf8"], 3, "not valid UTF-8"),
    ("missing source", ["prepare", "--set", "data.source={root}/nowhere"], 1, "neither an existing directory"),
    ("export: not a safetensors file", ["export", "--lora", "{root}/not_a_lora.safetensors", "-o", "{root}/o.safetensors"], 4, "not a readable .safetensors"),
    ("resume: not a checkpoint", ["train-spm", "--resume", "{root}/a_dir"], 1, "not an SPM checkpoint"),
    ("VAE not reachable offline", ["generate", "--set", "model.pretrained={root}/models/base", "--set", "model.vae=madebyollin/sdxl-vae-fp16-fix", "a red circle", "-o", "{root}/x.png"], 4, "model.vae"),
]


@pytest.mark.parametrize("name, args, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_message_not_a_traceback(world, name, args, code, words):
    argv = [a.format(root=world) for a in args]
    base = ["--preset", "tiny", "--set", f"paths.root={world}", "--set", "tracking.enabled=false"]
    if "--params" not in argv:
        base += ["--params", "/dev/null"]
    command = argv[:1] + base + argv[1:]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "spo.cli", *command], capture_output=True, text=True, timeout=300, env=env, cwd=world)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert words in proc.stderr, proc.stderr[-2000:]
