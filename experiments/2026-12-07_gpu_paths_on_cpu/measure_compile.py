"""Compile time and graph breaks of the lab's train.compile path per arch, on this machine's CPU.

    .venv/bin/python experiments/2026-12-07_gpu_paths_on_cpu/measure_compile.py llama_gqa [chunk_size]

One arch per process (run it once per arch; set TORCHINDUCTOR_CACHE_DIR to an empty folder for a cold compile).
Prints one JSON line: eager and compiled loss, seconds of the first compiled step (dynamo + inductor, forward and
backward), mean seconds of later compiled and eager steps, graph breaks, recompiles, unique graphs.
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_flops import TINY_VOCAB, arch_config  # noqa: E402  (the tests' tiny config: size=tiny, seq 64, vocab 256)

from lab.kernels import apply_fast_paths, causal_lm_loss, compile_model  # noqa: E402
from lab.models import build_model  # noqa: E402

arch = sys.argv[1]
chunk = int(sys.argv[2]) if len(sys.argv) > 2 else None
torch.manual_seed(0)
model = build_model(arch_config(arch)).train()
apply_fast_paths(model, "cpu")
ids = torch.randint(0, TINY_VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))


def step(m):
    m.zero_grad()
    start = time.perf_counter()
    loss = causal_lm_loss(m, ids, chunk)
    loss.backward()
    return loss.item(), time.perf_counter() - start


eager = copy.deepcopy(model)
eager_steps = [step(eager) for _ in range(6)]
compile_model(model, chunked_loss=bool(chunk))
compiled_steps = [step(model) for _ in range(6)]
print(json.dumps({
    "arch": arch, "loss_path": f"chunked({chunk})" if chunk else "transformers",
    "layers": model.config.num_hidden_layers, "torch": torch.__version__, "threads": torch.get_num_threads(),
    "eager_loss": eager_steps[0][0], "compiled_loss": compiled_steps[0][0],
    "first_compiled_step_s": round(compiled_steps[0][1], 2),
    "compiled_step_ms": round(1000 * sum(t for _, t in compiled_steps[1:]) / 5, 2),
    "eager_step_ms": round(1000 * sum(t for _, t in eager_steps[1:]) / 5, 2),
    "graph_breaks": sum(counters["graph_break"].values()), "graph_break_reasons": list(counters["graph_break"]),
    "recompiles": sum(counters["recompiles"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
}))
