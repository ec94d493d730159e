"""Data-parallel training on PyTorch's own engines, on CPU with gloo, started by the test itself and bounded in
time: 2-process DistributedDataParallel, and FSDP2 fully_shard where the installed torch supports it on CPU.
For every registered module example, after a few SGD steps on half of the batch per rank, the parameters equal
a single-process run over the whole batch."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import fastlayers
from fastlayers import registry

STEPS, WORLD, TIMEOUT_S = 3, 2, 300


def _examples():
    """[(label, fresh module, args, target)] from the registry's module examples (the first argument's batch is
    split over the ranks).
    BatchNorm in training mixes samples (equal results across ranks would need SyncBatchNorm), so modules
    holding one run in eval mode here."""
    out = []
    for op in registry.get():
        torch.manual_seed(0)
        for label, module, args in op.module_examples(torch.device("cpu")):
            if args[0].shape[0] % WORLD:
                continue  # the batch must split evenly over the ranks
            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
                module.eval()
            with torch.no_grad(), fastlayers.use_backend("triton"):
                res = module(*args)
            res = res[0] if isinstance(res, tuple) else res
            g = torch.Generator().manual_seed(2)
            out.append((f"{op.name}/{label}", module, args, torch.randn(res.shape, generator=g)))
    return out


def _train(model, args, target, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = model(*args)
        out = out[0] if isinstance(out, tuple) else out
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()
    return model


def _batched(a, first) -> bool:
    """The first argument carries the batch, and so does a per-sample bool mask (SparK's [B, 1, h, w]); other
    arguments (Swin's additive window mask, states) are shared."""
    return a is first or (isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.shape[:1] == first.shape[:1])


def _shard(t, rank):
    """This rank's part of the batch (dim 0 cut into WORLD equal parts)."""
    return t.chunk(WORLD)[rank]


def _worker(rank, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    states = {}
    try:
        for label, model, args, target in _examples():
            args = [_shard(a, rank) if _batched(a, args[0]) else a for a in args]
            with fastlayers.use_backend("triton"):
                if mode == "ddp":
                    _train(torch.nn.parallel.DistributedDataParallel(model), args, _shard(target, rank))
                    state = model.state_dict()
                else:
                    from torch.distributed.device_mesh import init_device_mesh
                    from torch.distributed.fsdp import fully_shard
                    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
                    _train(model, args, _shard(target, rank))
                    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                             for k, v in model.state_dict().items()}
            states[label] = {k: v.detach().clone() for k, v in state.items()}
        if rank == 0:
            torch.save(states, os.path.join(out_dir, "states.pt"))
    except Exception as e:  # reported to the parent, which decides between skip and failure
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode, tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode}: workers did not finish within {TIMEOUT_S} s")
    return [open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.startswith("error")]


def _compare(tmp_path):
    got = torch.load(tmp_path / "states.pt")
    for label, model, args, target in _examples():
        with fastlayers.use_backend("triton"):
            expected = _train(model, args, target).state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(got[label][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{label} {k}: {m}")


def test_ddp_matches_single_process(tmp_path):
    errors = _launch("ddp", tmp_path)
    assert not errors, errors
    _compare(tmp_path)


def test_fsdp2_matches_single_process(tmp_path):
    errors = _launch("fsdp", tmp_path)
    if errors and any("not supported" in e.lower() or "NotImplementedError" in e for e in errors):
        pytest.skip(f"FSDP2 on CPU is not supported by torch {torch.__version__}: {errors[0]}")
    assert not errors, errors
    _compare(tmp_path)
