"""Processes (issue 15, item 4): fork after multi-threaded op calls, torch.multiprocessing spawn, and DDP (gloo, CPU,
2 processes) training a zoo model.

fork: the parent's calls start fastllm's thread pool (kernels/cpp/parallel.cpp); a forked child has none of its
workers, and builds a fresh pool on its first multi-threaded call (pthread_atfork). The child's calls must return the
parent's results, never hang: each child is waited for with a timeout and killed, failing the test, if it does not
finish. Checked after the parent also ran torch's own OpenMP ops (a GEMM and a large elementwise op), whose libgomp
team does not survive fork: fastllm's kernels do not use OpenMP, so the child's fastllm calls still run (torch's own
multi-threaded ops in such a child are torch's matter; DataLoader workers set one thread for that reason). The
children report through hashes of their outputs' bytes (hashlib on numpy views: no torch op that could go
parallel in the child).

DDP: 2 spawned processes (gloo) train a 1-layer Llama of the zoo (fused ops forward and backward) for 3 SGD steps on
halves of one global batch; the parameters must equal a single-process run on the whole batch within fastllm's
criterion (fastllm.testing.assert_equivalent: DDP's error against the float64 run at most twice the single fp32
run's, plus one ulp).
"""

import hashlib
import multiprocessing
import os
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.testing import assert_equivalent

CHILD_TIMEOUT_S = 60
LINUX_TASKS = "/proc/self/task"


def _inputs():
    """Ops at shapes that give each call 2 threads (work >= 2 * _ext.GRAIN), from a fixed seed."""
    g = torch.Generator().manual_seed(11)

    def rn(*s):
        return torch.randn(*s, generator=g)

    return {
        "linear": (rn(8, 1024), rn(1000, 1024)),
        "flash_attention": (rn(2, 4, 129, 64), rn(2, 2, 129, 64), rn(2, 2, 129, 64)),
        "layer_norm": (rn(1000, 777), rn(777), rn(777)),
    }


def _run_ops(inputs) -> dict:
    """name -> sha256 of each output's bytes, computed at 2 threads on the C++ backend (inference: direct path)."""
    torch.set_num_threads(2)
    out = {}
    with fastllm.backend("cpp"), torch.no_grad():
        out["linear"] = fastllm.linear(*inputs["linear"], activation="gelu")
        out["flash_attention"] = fastllm.flash_attention(*inputs["flash_attention"], causal=True)
        out["layer_norm"] = fastllm.layer_norm(*inputs["layer_norm"])
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in out.items()}


def _tasks() -> int:
    return len(os.listdir(LINUX_TASKS)) if os.path.isdir(LINUX_TASKS) else 0


def _child(inputs, conn) -> None:
    """In the forked child: the ops' hashes and the thread count before / after (a pool of its own appears)."""
    before = _tasks()
    hashes = _run_ops(inputs)
    conn.send((hashes, before, _tasks()))
    conn.close()


def _torch_openmp() -> None:
    """torch's own multi-threaded ops (its OpenMP team, MKL / oneDNN GEMM) in the parent before the fork."""
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    (a @ a).sum()
    (torch.randn(1 << 22) * 2 + 1).sum()


@pytest.fixture
def cpp(need_backend):
    need_backend("cpp")
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def _wait(proc_alive, kill, what: str) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while proc_alive():
        if time.monotonic() > deadline:
            kill()
            pytest.fail(f"{what}: the forked child's calls did not return in {CHILD_TIMEOUT_S} s (hang)")
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
@pytest.mark.parametrize("parent_torch_omp", [False, True], ids=["fastllm-only", "after-torch-openmp"])
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing-fork"])
def test_fork_after_multithreaded_calls(cpp, how, parent_torch_omp):
    inputs = _inputs()
    expected = _run_ops(inputs)  # starts the parent's pool (2 threads)
    if parent_torch_omp:
        _torch_openmp()
    expected_again = _run_ops(inputs)
    assert expected_again == expected
    reader, writer = multiprocessing.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork of a multi-threaded process
        if how == "os.fork":
            pid = os.fork()
            if pid == 0:  # the child: never returns into pytest
                code = 1
                try:
                    _child(inputs, writer)
                    code = 0
                finally:
                    os._exit(code)
            state = {}

            def alive():
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    state["status"] = status
                return not done

            def kill():
                os.kill(pid, 9)
                os.waitpid(pid, 0)

            _wait(alive, kill, how)
            assert os.WIFEXITED(state["status"]) and os.WEXITSTATUS(state["status"]) == 0, state
        else:
            proc = multiprocessing.get_context("fork").Process(target=_child, args=(inputs, writer), daemon=True)
            proc.start()
            _wait(proc.is_alive, proc.kill, how)
            assert proc.exitcode == 0, f"child exit code {proc.exitcode}"
    writer.close()
    assert reader.poll(5), "the child sent no result"
    hashes, before, after = reader.recv()
    assert hashes == expected, f"the forked child's results differ: {hashes} vs {expected}"
    if sys.platform.startswith("linux") and (os.cpu_count() or 1) >= 2:
        assert after > before, f"the child ran on one thread (tasks {before} -> {after}): no pool was built"
    assert _run_ops(inputs) == expected  # the parent's pool still works


# ---------------------------------------------------------------------------------------------- spawn


def _spawn_worker(rank: int, out_dir: str) -> None:
    hashes = _run_ops(_inputs())
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(repr(sorted(hashes.items())))


def _join(ctx, what: str) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what}: spawned processes did not finish in {CHILD_TIMEOUT_S} s")


def test_torch_multiprocessing_spawn(cpp, tmp_path):
    """2 processes started with torch.multiprocessing.spawn (fresh interpreters importing fastllm) compute the
    parent's results."""
    expected = _run_ops(_inputs())
    ctx = torch.multiprocessing.spawn(_spawn_worker, args=(str(tmp_path),), nprocs=2, join=False)
    _join(ctx, "spawn")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == repr(sorted(expected.items())), rank


# ---------------------------------------------------------------------------------------------- DDP

STEPS, LR, BATCH, SEQ, VOCAB = 3, 0.5, 4, 12, 64


def _batch():
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]  # next-token targets


def _train(model, ids, targets) -> None:
    """STEPS of SGD on the mean next-token cross-entropy (model: a zoo Llama, or DDP around one)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1)).backward()
        opt.step()


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ddp_worker(rank: int, world: int, model_dir: str, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # 2 processes on the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = fastllm.models.from_pretrained(model_dir).train()
        ids, targets = _batch()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        _train(DistributedDataParallel(model), ids[part], targets[part])  # gradients averaged over the ranks
        save_file(_params(model), os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _llama_dir(path) -> str:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    fastllm.models.save_pretrained(fastllm.models.from_hf(transformers.LlamaForCausalLM(cfg)), path)
    return str(path)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this build")  # fmt: skip
def test_ddp_gloo_matches_single_process(tmp_path):
    from safetensors.torch import load_file

    model_dir = _llama_dir(tmp_path / "model")
    ids, targets = _batch()
    single = fastllm.models.from_pretrained(model_dir).train()
    _train(single, ids, targets)
    ref = fastllm.models.from_pretrained(model_dir, dtype=torch.float64).train()  # the reference path, float64
    _train(ref, ids, targets)
    ctx = torch.multiprocessing.spawn(_ddp_worker, args=(2, model_dir, str(tmp_path / "store"), str(tmp_path)),
                                      nprocs=2, join=False)  # fmt: skip
    _join(ctx, "DDP")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    start = fastllm.models.from_pretrained(model_dir).state_dict()
    want, want64 = _params(single), _params(ref)
    assert set(ranks[0]) == set(want), sorted(set(ranks[0]) ^ set(want))
    moved = 0
    for name in want:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the two ranks' parameters differ"
        assert_equivalent(ranks[0][name], want[name], want64[name], f"DDP {name}")
        moved += not torch.equal(want[name], start[name])
    assert moved == len(want), f"only {moved} of {len(want)} parameters changed in {STEPS} steps"
