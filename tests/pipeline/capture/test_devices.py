"""Device placement on a machine without a GPU: every bad device, runner or device_map input is one
line naming its key; a device_map that fits runs the real pass; workers claim distinct devices."""

from __future__ import annotations

import fcntl

import numpy as np
import pytest

from pipeline.capture import devices
from pipeline.capture.pass_setup import open_writer, teacher_for
from pipeline.capture.shard_plan import plan_shards
from pipeline.capture.teacher_pass import compute_shard
from pipeline.config import CacheConfig, ConfigError, DeviceError, parse_config


def _config(tmp_path, teacher, teacher_over=None, **over):
    data = {"store": str(tmp_path / "store"), "teacher": {"name": str(teacher), "batch_size": 2, **(teacher_over or {})},
            "corpus": {"kind": "builtin", "max_documents": 1}, "row_length": 32, "shard_rows": 2, "split": "train",
            "signals": {"topk": {"k": 8}}, **over}
    return parse_config(data, CacheConfig)


@pytest.mark.parametrize("teacher_over,over,match", [
    ({}, {"runner": {"kind": "thread", "devices": [0]}}, "runner.devices needs kind 'processes' or 'dask'"),
    ({}, {"runner": {"kind": "processes", "devices": [0, 0]}}, r"runner.devices \[0, 0\]: give distinct"),
    ({}, {"runner": {"kind": "processes", "devices": [0, 1], "workers": 3}}, "one worker per device"),
    ({}, {"runner": {"kind": "processes", "devices": [-1]}}, "runner.devices.0"),
    ({"device_map": "auto", "device": "cpu"}, {}, "leave teacher.device at auto"),
    ({"max_memory": {"cpu": "1GiB"}}, {}, "teacher.max_memory applies with teacher.device_map only"),
    ({"device_map": "auto"}, {"runner": {"kind": "processes", "devices": [0]}}, "use one or the other"),
    ({"device": "cpu"}, {"runner": {"kind": "dask", "devices": [0]}}, "must be auto or cuda"),
])
def test_bad_runner_and_placement_keys_are_one_line_config_errors(tmp_path, tiny_teacher_dir, teacher_over, over, match):
    with pytest.raises(ConfigError, match=match) as info:
        _config(tmp_path, tiny_teacher_dir, teacher_over, **over)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(devices.cuda_count() > 3, reason="the machine has the devices these tests name as missing")
@pytest.mark.parametrize("teacher_over,match", [
    ({"device": "cuda:3"}, r"teacher.device: cuda:3 does not exist; this machine has (no CUDA device|\d CUDA)"),
    ({"device": "gpu"}, r"teacher.device: 'gpu' is not a device"),
    ({"device_map": {"": 5}}, "teacher.device_map: cuda:5 does not exist"),
    ({"device_map": "auto", "max_memory": {7: "1GiB", "cpu": "1GiB"}}, "teacher.device_map: cuda:7 does not exist"),
    ({"device_map": "bogus"}, "teacher.device_map 'bogus': .*bogus"),
    ({"device_map": "auto", "max_memory": {"cpu": "10KB"}}, "teacher.device_map 'auto' does not fit: .*disk"),
])
def test_missing_devices_and_maps_that_do_not_fit_are_named(tmp_path, tiny_teacher_dir, teacher_over, match):
    with pytest.raises(DeviceError, match=match) as info:
        teacher_for(_config(tmp_path, tiny_teacher_dir, teacher_over))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(devices.cuda_count() > 0, reason="checks the error of a machine without a GPU")
def test_runner_devices_the_machine_lacks(tmp_path, tiny_teacher_dir):
    cfg = _config(tmp_path, tiny_teacher_dir, runner={"kind": "processes", "devices": [0, 1]})
    with pytest.raises(DeviceError, match=r"runner.devices: cuda:0 does not exist; this machine has no CUDA device"):
        devices.check_runner_devices(cfg)
    with pytest.raises(DeviceError, match=r"runner.devices: cuda:0 does not exist"):  # `kdcache plan` too
        teacher_for(cfg)


def test_a_device_map_that_fits_runs_the_pass_as_without_one(tmp_path, tiny_teacher_dir):
    plain = _config(tmp_path, tiny_teacher_dir)
    spread = _config(tmp_path, tiny_teacher_dir, {"device_map": "auto", "max_memory": {"cpu": "2GiB"}})
    a, b = teacher_for(plain), teacher_for(spread)
    assert a is not b and b.device.type == "cpu"
    spec = open_writer(plain, a).meta.spec
    plan = plan_shards(plain, a.tokenizer)[0]
    x, y = compute_shard(a, spec, plan, 2), compute_shard(b, spec, plan, 2)
    np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
    np.testing.assert_allclose(x["topk_logp"], y["topk_logp"], rtol=1e-6)


def test_workers_claim_distinct_devices_until_none_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_claimed", None)
    other = open(tmp_path / "kdcache-device-0.lock", "a")  # another worker holds device 0
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert devices.claim_device([0, 1], str(tmp_path)) == 1
    assert devices.claim_device([0, 1], str(tmp_path)) == 1  # held for the life of the process
    held = devices._claimed
    monkeypatch.setattr(devices, "_claimed", None)  # a third worker: both taken
    with pytest.raises(DeviceError, match=r"runner.devices \[0, 1\]: every device is taken"):
        devices.claim_device([0, 1], str(tmp_path))
    held[1].close()
    other.close()


def test_out_of_memory_names_the_batch_size_and_a_smaller_one():
    err = devices.out_of_memory("abc-00003", 16, "cuda:1")
    assert isinstance(err, ConfigError) and "\n" not in str(err)
    assert "teacher.batch_size 16" in str(err) and "set teacher.batch_size to 8 or less" in str(err)
    assert "re-run resumes" in str(err)
    assert devices.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                                                 "memory: you tried to allocate 402653184 bytes"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))
