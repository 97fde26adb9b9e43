"""docs/memory.md's table: kmp's estimate against XLA's plan for an H100, GPT-2 124M to 1.5B.

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python docs/memory.py measure triton   # ~25 compiles
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
        python docs/memory.py measure cublas
    python docs/memory.py table      # the Markdown table, estimates recomputed from kmp's model,
                                     # and kmp/gpt/memory_checks.py (what kmp plan cites)
    python docs/memory.py peak DIR   # what one plan holds at its peak, from XLA's dump in DIR

`measure` compiles (kmp.gpt.compiled.compile_step) each row at batch 8 x 1024 per GPU and
appends the plans to docs/data/memory_h100.jsonl; rows already there are skipped. Where the
step would not fit in 80 GB, XLA rematerializes on its own until it does: those rows are also
compiled for an H100 with 1 TiB ("unbounded"), the plan the estimate models. cuBLAS plans are
taken for 124M only (they show how far the matmul kernels move the plan). `table`
reads them back, so a change to the estimate needs no recompilation.

`peak` reads the buffer report of one compile made with XLA's dump on, e.g.

    XLA_FLAGS="--xla_dump_to=/tmp/fsdp --xla_dump_hlo_as_text" KERAS_BACKEND=jax \
        JAX_PLATFORMS=cpu kmp memory --preset gpt2-1.5b --batch-size 64 --seq-len 1024 \
        --precision mixed_bfloat16 --mesh data=8 --shard fsdp --remat blocks \
        --measure compile --gemm triton
    python docs/memory.py peak /tmp/fsdp

and sums the buffers live at the plan's peak (the live-range report's "Live ranges at N
(peak)") by what made them (the state; forward, backward and rematerialized ops, from the
ops' names; all-gathers and reduce-scatters), by shape, and by op.
"""
import json
import pprint
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data" / "memory_h100.jsonl"
CHECKS = Path(__file__).parents[1] / "kmp" / "gpt" / "memory_checks.py"
PRESETS = ("gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1.5b")
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
REMATS = ("none", "blocks")
# (preset, devices, mesh, shard, remat): sharded rows, mixed_bfloat16 (kmp.gpt.sharding's
# layouts on 8 GPUs)
SHARDED = (("gpt2-1.5b", 8, "data=8", "fsdp", "none"), ("gpt2-1.5b", 8, "data=8", "fsdp", "blocks"),
           ("gpt-6.7b", 8, "data=2,model=4", "fsdp+tp", "none"),
           ("gpt-6.7b", 8, "data=8", "fsdp", "blocks"))


def rows():
    for name in PRESETS:
        for remat in REMATS:
            for policy in POLICIES:
                yield name, policy, remat, 1, "", ""
    for name, devices, mesh, shard, remat in SHARDED:
        yield name, "mixed_bfloat16", remat, devices, mesh, shard


UNBOUNDED = 2**40


def key(name, policy, remat, devices, mesh, shard, gemm, limit=0):
    return name, policy, remat, devices, mesh, shard, gemm, limit


def load() -> dict:
    done = {}
    if DATA.exists():
        for line in DATA.read_text().splitlines():
            r = json.loads(line)
            done[key(r["preset"], r["policy"], r["remat"], r["devices"], r["mesh"], r["shard"],
                     r["gemm"], r.get("memory_limit", 0))] = r
    return done


def config_of(name, remat, mesh, shard, devices=1):
    """Batch 8 x 1024 per data-parallel GPU (batch_size is the global batch)."""
    from kmp.gpt.config import preset
    from kmp.gpt.sharding import parse_mesh

    data = parse_mesh(mesh).get("data", devices) if mesh else devices
    return preset(name, batch_size=8 * data, seq_len=1024, remat=remat, mesh=mesh, shard=shard)


def measure(gemm: str) -> None:
    from kmp.gpt.compiled import compile_step
    from kmp.gpt.gpus import gpu
    from kmp.gpt.memory import estimate_memory

    done, memory = load(), gpu("h100").memory
    DATA.parent.mkdir(exist_ok=True)

    def compiled(row, config, limit):
        if key(*row, gemm, limit) not in done:
            plan = compile_step(config, row[1], "h100", *row[3:], gemm, limit or None)
            record = {"preset": row[0], "mesh": row[4], "shard": row[5], **plan.to_json()}
            print(json.dumps(record), flush=True)
            with DATA.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[key(*row, gemm, limit)] = record
        return done[key(*row, gemm, limit)]

    for row in rows():
        name, policy, remat, devices, mesh, shard = row
        if gemm == "cublas" and name != PRESETS[0]:
            continue
        config = config_of(name, remat, mesh, shard, devices)
        if estimate_memory(config, policy).total < 0.6 * memory:
            compiled(row, config, 0)
        elif compiled(row, config, UNBOUNDED)["total"] > 0.8 * memory:
            compiled(row, config, 0)  # XLA rematerializes to fit 80 GB: its own plan too


def table() -> None:
    from kmp.gpt.memory import estimate_memory, param_count

    done, gib, worst, checks = load(), 2**30, 0.0, []
    print("| model | GPUs | policy | remat | estimate (GiB) | XLA H100, Triton | XLA H100, "
          "cuBLAS | XLA H100 without the 80 GB limit | estimate / XLA |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, policy, remat, devices, mesh, shard in rows():
        found = {(g, lim): done.get(key(name, policy, remat, devices, mesh, shard, g, lim))
                 for g in ("triton", "cublas") for lim in (0, UNBOUNDED)}
        if not found["triton", 0] and found["triton", UNBOUNDED] and (
                found["triton", UNBOUNDED]["total"] <= 0.8 * 81559 * 2**20):
            found["triton", 0] = found["triton", UNBOUNDED]  # within 80 GB: the same plan
        triton = found["triton", 0]
        if not triton:
            continue
        config = config_of(name, remat, mesh, shard, devices)
        est = estimate_memory(config, policy).total
        reference = found["triton", UNBOUNDED] or triton  # the plan without XLA's own remat
        ratio = est / reference["total"]
        worst = max(worst, abs(ratio - 1))
        checks.append({"preset": name, "params": param_count(config), "policy": policy,
                       "remat": remat, "devices": devices, "shard": shard,
                       "ratio": round(ratio, 3)})
        where = f"{devices} ({mesh}, {shard})" if mesh else str(devices)
        cells = [f"{p['total'] / gib:.2f}" if p else "-" for p in
                 (found["cublas", 0], found["triton", UNBOUNDED])]
        print(f"| {name} | {where} | {policy} | {remat} | {est / gib:.2f} | "
              f"{triton['total'] / gib:.2f} | {cells[0]} | {cells[1]} | {ratio:.3f} |")
    print(f"\nworst |estimate / XLA - 1| (against the plan without the limit where there is "
          f"one): {worst:.1%}")
    CHECKS.write_text(
        '"""Generated by docs/memory.py: kmp\'s memory estimate against XLA\'s plan for an H100\n'
        '(Triton matmuls; without the 80 GB limit where XLA would rematerialize to fit), GPT-2\n'
        'sizes at batch 8 x 1024 per GPU. `kmp plan` cites the nearest."""\n'
        "\nCHECKS = " + pprint.pformat(checks, width=96, sort_dicts=False) + "\n")


def peak(folder: str, top: int = 25) -> None:
    import collections
    import re

    def one(pattern):
        return next(Path(folder).glob(f"*jit_train_step*gpu_after_optimizations{pattern}"))

    text = one("-live-range.txt").read_text()
    found = re.search(r"Live ranges at (\d+) \(peak\):\n(.*?)\n  Stack trace", text, re.S)
    made = {}  # instruction -> (shape, opcode, op name)
    for line in one(".txt").read_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            made[m[1]] = (m[2], m[3], op[1] if op else "")
    kinds, shapes, ops, total = (collections.Counter(), collections.Counter(),
                                 collections.Counter(), 0)
    for name, index, size in re.findall(r"^\s+(\S+?)\{([\d,]*)\}: (\d+) bytes",
                                        found[2], re.M):
        shape, opcode, op = made.get(name, ("?", "?", ""))
        parts = re.findall(r"\w+\[[\d,]*\]", shape)
        if index and len(parts) > int(index.split(",")[0]):
            parts = parts[int(index.split(",")[0]):]
        kind = next((k for k in ("param", "all-gather", "reduce-scatter", "all-reduce")
                     if name.startswith(k) or opcode.startswith(k)), None) or (
            "rematerialized" if "rematted" in op else "backward" if "transpose(jvp" in op
            else "forward" if "jvp(" in op else "other")
        size, total = int(size), total + int(size)
        kinds[kind] += size
        shapes[kind, parts[0] if parts else "?"] += size
        ops[kind, re.sub(r"transformer_layer_\d+", "L", op)[-90:]] += size
    print(f"peak at {found[1]}: {total / 2**30:.2f} GiB live")
    for title, counts in (("kind", kinds), ("kind, shape", shapes), ("kind, op", ops)):
        print(f"by {title}:")
        for key, size in counts.most_common(top):
            print(f"  {size / 2**20:10.1f} MiB  {key}")


if __name__ == "__main__":
    {"measure": lambda: measure(sys.argv[2]), "table": table,
     "peak": lambda: peak(sys.argv[2])}[sys.argv[1]]()
