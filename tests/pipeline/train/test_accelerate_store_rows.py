"""Two processes under `accelerate launch` (CPU, gloo): KDTrainer and KDSFTTrainer read every row
of a store exactly once per epoch across the ranks, and resuming from a Trainer checkpoint (which
holds each rank's stream position) ends in the same weights, bit for bit, as the straight run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from short_docs import cache_short_docs, write_short_docs

from kdstore.reader import StoreReader

SCRIPT = Path(__file__).with_name("accelerate_store_rows.py")
REPO = Path(__file__).resolve().parents[3]


def _launch(store: str, teacher: Path, out: Path, port: int, resume: str = "") -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(SCRIPT), "--store", store, "--teacher", str(teacher), "--out", str(out), "--resume", resume]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_each_row_once_and_resume_bitwise(tmp_path, tiny_teacher_dir):
    store = str(cache_short_docs(tmp_path / "store", tiny_teacher_dir, write_short_docs(tmp_path), split="all"))
    rows = sorted(int(i) for i in StoreReader(store).sample_ids())
    assert len(rows) == 57  # 28 and 29 rows per rank: 3 batches of 10 each per epoch; 4 steps cross into epoch 2
    out = tmp_path / "runs"
    _launch(store, tiny_teacher_dir, out, _free_port())
    _launch(store, tiny_teacher_dir, out, _free_port(), resume="checkpoint-2")
    for r in (0, 1):  # a batch size giving the ranks different step counts is refused before the first step
        message = (out / "hf" / f"unequal_rank{r}.txt").read_text()
        assert message.endswith("57 rows over 2 ranks give [28, 29] batches of 1 per rank per epoch; every rank "
                                "must take the same number of steps: change per_device_train_batch_size or the world size")
    for kind in ("hf", "trl"):
        ranks = [json.loads((out / kind / f"ids_straight_rank{r}.json").read_text()) for r in (0, 1)]
        assert all(len(steps) == 4 for steps in ranks)
        epoch1 = sorted(i for steps in ranks for batch in steps[:3] for i in batch)
        assert epoch1 == rows, kind  # every row once, none twice, across the two ranks
        epoch2 = [i for steps in ranks for batch in steps[3:] for i in batch]
        assert len(epoch2) == len(set(epoch2)) == 20 and ranks[0][3] != ranks[0][0]  # a new epoch, reshuffled
        for r in (0, 1):  # the resumed run takes the straight run's batches from step 3 on
            resumed = json.loads((out / kind / f"ids_checkpoint-2_rank{r}.json").read_text())
            assert resumed == ranks[r][2:], (kind, r)
        assert (out / kind / "checkpoint-2" / "kd_stream_rank1.json").is_file()
        straight = load_file(str(out / kind / "weights_straight.safetensors"))
        again = load_file(str(out / kind / "weights_checkpoint-2.safetensors"))
        assert straight.keys() == again.keys()
        assert all(torch.equal(straight[k], again[k]) for k in straight), kind
