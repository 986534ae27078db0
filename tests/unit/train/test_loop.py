"""What the workers do besides the epoch itself (osmd_ray.train.loop): their DeepSpeed
configuration, prefetching, progress, and each rank's share of an evaluation split."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from osmd_ray.config import load_config
from osmd_ray.train.epoch import ForwardOnly, evaluate, evaluate_with_rows, uses_bf16
from osmd_ray.train.loop import (
    PrefetchedBatches,
    WaitTimer,
    deepspeed_config,
    rank_share,
)


def test_bf16_engine_casts_buffers_with_the_weights(configs_dir):
    # DeepSpeed >= 0.18 keeps buffers in fp32 unless told otherwise; BatchNorm's running
    # statistics then mismatch its bf16 weights (found on an H200, benchmarks/RESULTS.md).
    cfg = load_config(configs_dir / "osmd_synth.yaml", ["scaling.use_gpu=true"])
    assert uses_bf16(cfg)
    ds = deepspeed_config(cfg, use_bf16=True)
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"]["buffer_dtype"] == "bf16"


def test_fp32_engine_leaves_dtypes_alone(configs_dir):
    cfg = load_config(configs_dir / "osmd_synth.yaml", ["train.zero_stage=3"])
    assert not uses_bf16(cfg)
    ds = deepspeed_config(cfg, use_bf16=False)
    assert ds["bf16"] == {"enabled": False}
    assert "data_types" not in ds
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size


def test_cpu_workers_skip_the_shared_memory_op_build(monkeypatch):
    import importlib

    import deepspeed.ops

    from osmd_ray.train.deepspeed_setup import skip_cpu_shared_memory_op

    # Restored after the test: the mark is process-wide.
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", dict(deepspeed.ops.__compatible_ops__))
    assert skip_cpu_shared_memory_op()
    # What DeepSpeed's communication backend calls when it starts: None means no JIT build.
    # (deepspeed.comm's attribute `torch` is torch itself, hence import_module.)
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


def test_cpu_workers_use_as_many_torch_threads_as_they_hold_cpus(configs_dir):
    import torch

    from osmd_ray.train.loop import set_cpu_threads

    before = torch.get_num_threads()
    try:
        for cpus, threads in ((1, 1), (2.5, 2), (0.5, 1)):
            cfg = load_config(configs_dir / "osmd_synth.yaml", [f"scaling.cpus_per_worker={cpus}"])
            assert set_cpu_threads(cfg) == threads == torch.get_num_threads()
        torch.set_num_threads(1)
        gpu = load_config(configs_dir / "osmd_synth.yaml", ["scaling.use_gpu=true"])
        assert set_cpu_threads(gpu) == 1  # GPU runs keep what torch has
    finally:
        torch.set_num_threads(before)


def test_prefetch_starts_the_pipeline_before_the_loop_asks_and_yields_every_batch():
    started = threading.Event()

    def slow_batches():
        started.set()
        time.sleep(0.3)  # a pipeline start-up
        yield from range(5)

    prefetched = PrefetchedBatches(slow_batches)
    assert started.wait(5), "the pipeline did not start before iteration"
    time.sleep(0.5)  # the worker builds its model meanwhile
    timed = WaitTimer(prefetched)
    assert list(timed) == [0, 1, 2, 3, 4]
    assert timed.first_wait_s < 0.2, "the start-up was not hidden"
    assert timed.first_wait_s <= timed.wait_s


def test_wait_timer_counts_the_time_spent_waiting_for_batches():
    def batches():
        for i in range(3):
            time.sleep(0.1)
            yield i

    timed = WaitTimer(batches())
    assert list(timed) == [0, 1, 2]
    assert 0.1 <= timed.first_wait_s < timed.wait_s
    assert timed.wait_s >= 0.3


def test_prefetch_errors_reach_the_training_loop():
    def broken():
        raise OSError("shard part-00003.parquet is truncated")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="part-00003"):
        list(PrefetchedBatches(broken))


def test_prefetch_of_an_empty_epoch_yields_nothing():
    assert list(WaitTimer(PrefetchedBatches(lambda: iter([])))) == []


def test_progress_goes_to_the_workers_log_once_the_queue_is_gone(capsys):
    """A dead progress queue (its node died) must not fail the training worker."""
    from ray.exceptions import RayActorError

    from osmd_ray.train.loop import _progress_reporter

    class DeadQueue:
        puts = 0

        def put(self, line: str) -> None:
            DeadQueue.puts += 1
            raise RayActorError()

    say = _progress_reporter(DeadQueue())
    say("epoch 1")
    say("epoch 2")
    assert DeadQueue.puts == 1  # given up after the first failure
    assert capsys.readouterr().out.splitlines() == ["[osmd] epoch 1", "[osmd] epoch 2"]


CPU = torch.device("cpu")


def _split(n: int, batch: int, classes: int = 3) -> list[dict[str, torch.Tensor]]:
    """A split of ``n`` rows as a worker reads it whole: batches of ``batch`` rows, row i
    holding x = i (so its identity) and a label."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    label = torch.arange(n) % classes
    return [{"x": x[i : i + batch], "label": label[i : i + batch]} for i in range(0, n, batch)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [2, 31, 32, 33])
def test_each_rank_takes_a_disjoint_share_and_all_run_equally_many_forwards(n, world):
    shares = [list(rank_share(_split(n, 4), r, world)) for r in range(world)]
    assert len({len(share) for share in shares}) == 1, "unequal forward counts (ZeRO-3 hangs)"
    scored = [b for share in shares for b in share if not isinstance(b, ForwardOnly)]
    rows = sorted(int(v) for b in scored for v in b["x"][:, 0])
    assert rows == list(range(n)), "a row was scored twice or not at all"
    padding = [b for share in shares for b in share if isinstance(b, ForwardOnly)]
    assert all(len(b["label"]) == 1 for b in padding)


class _Nearest(nn.Module):
    """Logits from a row's x alone, counting its forwards (a stand-in for the engine)."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.forwards += 1
        x = batch["x"]
        return {"deploy_logits": torch.cat([torch.sin(x), torch.cos(x), torch.sin(2 * x)], 1)}


def test_ranks_evaluations_add_up_to_the_whole_split_scored_once():
    n, world = 33, 2
    whole = evaluate(_Nearest(), _split(n, 64), ("deploy",), CPU)
    nets = [_Nearest() for _ in range(world)]
    # What all_reduce_sum adds up over ranks: the correct rows and the rows of each rank.
    results = [
        evaluate_with_rows(nets[r], rank_share(_split(n, 8), r, world), ("deploy",), CPU)
        for r in range(world)
    ]
    assert sum(rows for _, rows in results) == n
    correct = sum(scores["deploy"]["accuracy"] * rows for scores, rows in results)
    assert correct / n == pytest.approx(whole["deploy"]["accuracy"], abs=1e-12)
    # 33 rows in batches of 8: 5 batches, rank 0 scores 3 (8 + 8 + 1 rows), rank 1 two and
    # runs a third forward-only.
    assert [net.forwards for net in nets] == [3, 3]
    assert [rows for _, rows in results] == [17, 16]


def test_segmentation_evaluation_counts_its_rows_and_skips_forward_only_batches():
    class PerPixel(nn.Module):
        def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"deploy_logits": batch["x"]}

    manifest = SimpleNamespace(task="segmentation", num_classes=2, ignore_index=-100)
    x = torch.zeros(3, 2, 4, 4)
    x[:, 1] = 1.0  # class 1 everywhere
    label = torch.ones(3, 4, 4, dtype=torch.long)
    batches = [{"x": x[:2], "label": label[:2]}, ForwardOnly({"x": x[:1], "label": 1 - label[:1]})]
    scores, rows = evaluate_with_rows(PerPixel(), batches, ("deploy",), CPU, manifest)
    assert rows == 2
    assert scores["deploy"]["accuracy"] == 1.0  # the forward-only rows would be wrong
