"""Inference and training ms/batch of mim bench train's TorchRec model on one rank: the
planner's own plan against every table constrained to table_wise (argv: device, ubms...)."""
import sys
from dataclasses import replace

import torch

from mim_rec.ciubm.config import TableConstraint
from mim_rec.ciubm.sparse import TABLE_NAMES
from train.bench_train import (TrainBenchConfig, VARIANTS, _process_group, _seconds, _work, bench_sizes,
                               build_torchrec, mm_vectors, synthetic_batches, warm_up)

device = sys.argv[1]
ubms = sys.argv[2:] or ["avg"]
config = TrainBenchConfig(device=device, ubms=ubms, steps=20 if device == "cuda" else 2)
sizes = bench_sizes(config)
with _process_group(device) as ctx:
    batches = [b.to(ctx.device) for b in synthetic_batches(config)]
    for ubm in ubms:
        for variant in ("Base", "Base+MIM"):
            results = {}
            for plan in ("planner", "table_wise"):
                constraints = {} if plan == "planner" else {t: TableConstraint(sharding_types=["table_wise"]) for t in TABLE_NAMES}
                model_config = replace(config.model, ubm=ubm, mm_dim=config.mm_dim, constraints=constraints, **VARIANTS[variant])
                model, step = build_torchrec(config, model_config, sizes, ctx, mm_vectors(config, sizes))
                kinds = sorted({f"{n}:{p.sharding_type}" for m in model.plan.plan.values() for n, p in m.items()})
                warm_up(model, step, batches, config)
                out = {}
                for mode in ("train", "infer"):
                    model.train(mode == "train")
                    work = _work(mode, model, step, config.model.dien_aux_weight)
                    times = [_seconds(work, batches, config.steps, ctx.device) / config.steps * 1e3 for _ in range(3)]
                    out[mode] = sorted(times)[1]
                results[plan] = out
                print(f"{ubm:5s} {variant:9s} {plan:10s} train {out['train']:7.2f} ms  infer {out['infer']:7.2f} ms  {' '.join(kinds)}", flush=True)
            print(f"{ubm:5s} {variant:9s} table_wise/planner time: train {results['table_wise']['train'] / results['planner']['train']:.2f}x "
                  f"infer {results['table_wise']['infer'] / results['planner']['infer']:.2f}x", flush=True)
